// Command vcsim serves govmomi's vCenter simulator (simulator.VPX) for pytest-vmenv's tests.
//
// Debian's golang-github-vmware-govmomi-dev ships the simulator library but not its main
// package, so this is a small one: it listens on -l (127.0.0.1:0 picks a free port), requires
// -username/-password when given (otherwise vcsim accepts any non-empty login), and writes
// the SDK URL (without credentials), its TLS certificate (PEM) and its pid to files, so a
// script can start it in the background and tests can verify its certificate.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"time"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func writeFile(path, data string) {
	if path == "" {
		return
	}
	tmp := path + ".part"
	if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
		log.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		log.Fatal(err)
	}
}

// methodDelays parses "CloneVM_Task=200,PowerOnVM_Task=50" (milliseconds per method).
func methodDelays(spec string) map[string]int {
	delays := map[string]int{}
	for _, item := range strings.Split(spec, ",") {
		if item == "" {
			continue
		}
		name, ms, ok := strings.Cut(item, "=")
		n, err := strconv.Atoi(ms)
		if !ok || err != nil {
			log.Fatalf("-method-delay: %q is not METHOD=MILLISECONDS", item)
		}
		delays[name] = n
	}
	return delays
}

// selfSigned makes a fresh P-256 certificate for 127.0.0.1 and localhost. The simulator's
// built-in test certificate is RSA-1024, which OpenSSL's default security level rejects, and
// the point of the exercise is that clients verify certificates.
func selfSigned() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	template := x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "vcsim", Organization: []string{"pytest-vmenv test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, &template, &template, &key.PublicKey, key)
	if err != nil {
		log.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address (port 0 picks a free port)")
	username := flag.String("username", "", "required login user (empty: any non-empty user)")
	password := flag.String("password", "", "required login password")
	clusters := flag.Int("cluster", 1, "clusters per datacenter")
	hosts := flag.Int("host", 1, "standalone hosts per datacenter")
	clusterHosts := flag.Int("cluster-host", 3, "hosts per cluster")
	vms := flag.Int("vm", 2, "VMs per host and per cluster resource pool")
	delay := flag.Int("delay", 0, "delay of every SOAP method, in milliseconds")
	methodDelay := flag.String("method-delay", "", "per-method delays: NAME=MS[,NAME=MS...]")
	useTLS := flag.Bool("tls", true, "serve https")
	urlFile := flag.String("url-file", "", "write the SDK URL here once listening")
	certFile := flag.String("cert-file", "", "write the server's TLS certificate (PEM) here")
	pidFile := flag.String("pid-file", "", "write this process's pid here")
	flag.Parse()

	model := simulator.VPX()
	model.Cluster = *clusters
	model.Host = *hosts
	model.ClusterHost = *clusterHosts
	model.Machine = *vms
	model.DelayConfig.Delay = *delay
	model.DelayConfig.MethodDelay = methodDelays(*methodDelay)
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	if *useTLS {
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{selfSigned()}}
	}
	server := model.Service.NewServer()
	defer server.Close()

	sdk := *server.URL
	sdk.User = nil
	if *useTLS {
		cert := server.Certificate()
		writeFile(*certFile, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})))
	}
	writeFile(*pidFile, strconv.Itoa(os.Getpid())+"\n")
	writeFile(*urlFile, sdk.String()+"\n")
	fmt.Println(sdk.String())

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
