"""What a failed guest command most likely means, said in words a test author can act on.

Every backend runs provision steps and ``ready=`` probes the same way and reports their
failures through :func:`provision_failed` and :func:`missing_command`, so the hints are the
same everywhere:

* exit status 127 with the shell's "not found" complaint (or the guest's, when ``argv[0]``
  does not exist) names the command the image lacks;
* a step that fetches from the internet (``apt-get``, ``pip``, ``curl``, ``git clone``...),
  fails on a machine that has no outbound network, and complains of the network (a name that
  does not resolve, an unreachable network) says that this is why, and what to do instead.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from .errors import ProvisionError, command_text

__all__ = ["fetches", "missing_command", "not_found", "offline_error", "provision_failed"]

NOT_FOUND = 127
_NOT_FOUND = re.compile(r"([^\s:'\"]+)'?: (?:command )?not found\s*$", re.MULTILINE)
_NO_FILE = re.compile(r"([^\s:'\"]+)'?: No such file or directory\s*$", re.MULTILINE)
_APT = ("install", "update", "upgrade", "dist-upgrade", "full-upgrade", "download", "source",
        "build-dep")  # fmt: skip
_FETCHERS: dict[str, tuple[str, ...] | None] = {  # program: the verbs that fetch (None: any)
    "apt-get": _APT, "apt": _APT, "aptitude": _APT, "apk": ("add", "update", "upgrade"),
    "dnf": ("install", "update", "upgrade", "makecache"), "yum": ("install", "update", "makecache"),
    "zypper": ("install", "in", "refresh", "update"), "pacman": None, "snap": ("install",),
    "pip": ("install", "download", "wheel"), "pip3": ("install", "download", "wheel"),
    "pipx": None, "uv": None, "poetry": ("install", "add", "update", "lock"),
    "curl": None, "wget": None,
    "git": ("clone", "fetch", "pull", "submodule", "ls-remote"),
    "npm": ("install", "i", "ci", "update", "add"), "npx": None, "yarn": None, "pnpm": None,
    "gem": ("install", "update"), "cargo": None,
    "go": ("get", "install", "mod"), "docker": ("pull",), "podman": ("pull",),
}  # fmt: skip
_OFFLINE = re.compile(  # what fetchers print when there is no network to fetch over
    r"Temporary failure (?:resolving|in name resolution)|Could not resolve|"
    r"Name or service not known|Network is unreachable|No route to host|"
    r"Failed to establish a new connection|getaddrinfo|EAI_AGAIN|ENOTFOUND|ENETUNREACH|"
    r"Could not connect to|Connection refused|unable to access '",
    re.IGNORECASE,
)
_WRAPPERS = ("sudo", "env", "nice", "nohup", "time", "timeout", "xargs", "exec")
NO_OUTBOUND = (
    "the machine has no outbound network, so {tool!r} cannot download anything. Use an "
    "image that already has what this step fetches (a rootfs directory or tarball built "
    'with it; with image="host", install it on the host), or copy the files in from a '
    "test or fixture with vm.put(...)"
)


def _words(command: str | Sequence[str]) -> list[list[str]]:
    """The simple commands of ``command`` (split at ``;``, ``&&``, ``|``...), as words."""
    if not isinstance(command, str):
        return [list(command)]
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    try:
        for token in lexer:
            if token and set(token) <= set("();&|<>"):
                out.append([])
            else:
                out[-1].append(token)
    except ValueError:  # unbalanced quotes: the shell said so already
        return [command.split()]
    return [words for words in out if words]


def _program(words: list[str]) -> tuple[str, list[str]]:
    """The program a simple command runs (past ``VAR=x``, ``sudo -E``, ``timeout 30``...)
    and its arguments."""
    rest = list(words)
    while rest and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", rest[0]):
        rest.pop(0)
    while len(rest) > 1 and rest[0].rsplit("/", 1)[-1] in _WRAPPERS:
        rest.pop(0)
        while len(rest) > 1 and re.fullmatch(r"-.*|[0-9.]+[smhd]?|[A-Za-z_]\w*=.*", rest[0]):
            rest.pop(0)
    if not rest:
        return "", []
    return rest[0].rsplit("/", 1)[-1], rest[1:]


def fetches(command: str | Sequence[str]) -> str | None:
    """The network fetcher ``command`` runs (``"apt-get"``, ``"git clone"``...), else None."""
    for words in _words(command):
        program, args = _program(words)
        if re.fullmatch(r"python[0-9.]*", program) and args[:2] == ["-m", "pip"]:
            program, args = "pip", args[2:]
        if program not in _FETCHERS:
            continue
        verbs = _FETCHERS[program]
        if verbs is None:
            return program
        verb = next((a for a in args if a in verbs), None)
        if verb is not None:
            return program if program.startswith("apt") else f"{program} {verb}"
    return None


def missing_command(exit_code: int | None, stderr: str) -> str | None:
    """The command the guest could not find, if ``exit_code`` is 127 and the shell (or the
    guest's exec) said which: ``sh: 1: pg_isready: not found``, ``bash: foo: command not
    found``, ``vmenv: /bin/sh: No such file or directory``."""
    if exit_code != NOT_FOUND:
        return None
    named = _NOT_FOUND.findall(stderr) or _NO_FILE.findall(stderr)
    return str(named[-1]) if named else None


def offline_error(stdout: str, stderr: str) -> bool:
    """Whether a failed command's output says the network was not there."""
    return _OFFLINE.search(stderr) is not None or _OFFLINE.search(stdout) is not None


def not_found(missing: str) -> str:
    """Words for a command the guest could not run (exit 127): missing, or a script whose
    ``#!`` interpreter is missing (the shell says "not found" for both)."""
    return (
        f"command {missing!r} not found in the guest image (exit {NOT_FOUND}; if it is there, "
        "the interpreter on its #! line is not)"
    )


def _indent(text: str, lines: int = 30) -> str:
    parts = text.rstrip("\n").splitlines()
    if len(parts) > lines:
        parts = [f"... ({len(parts) - lines} lines cut)", *parts[-lines:]]
    return "\n".join("    " + p for p in parts) if parts else "    (empty)"


def provision_failed(
    backend: str,
    machine: str,
    step: str | Sequence[str],
    exit_code: int,
    stdout: str,
    stderr: str,
    *,
    outbound: bool | None,
) -> ProvisionError:
    """The error for a provision step that exited non-zero, with the most likely cause.

    ``outbound`` is whether the machine could reach the internet while it was provisioned
    (``None``: the backend cannot tell, so no network hint is given). The hint needs the
    step's own word for it too (:func:`offline_error`): a fetch that failed for another
    reason (no such package) is not blamed on the network.
    """
    shown = command_text(step)
    missing = missing_command(exit_code, stderr)
    if missing is not None:
        head = (
            f"{backend}: provision step {shown!r} of {machine!r} failed: {not_found(missing)}; "
            "install it in the image" + ("" if "/" in missing else ", or call it by its full path")
        )
    else:
        head = f"{backend}: provision step {shown!r} of {machine!r} exited with {exit_code}"
    text = f"{head}\n  stdout:\n{_indent(stdout)}\n  stderr:\n{_indent(stderr)}"
    offline = missing is None and outbound is False and offline_error(stdout, stderr)
    tool = fetches(step) if offline else None
    if tool is not None:
        text += "\n  hint: " + NO_OUTBOUND.format(tool=tool)
    return ProvisionError(text)
