"""Patch a copy of govmomi 0.24.2's simulator for the two bugs pyvmomi 9 hits.

Usage: ``python3 patch_govmomi.py GOVMOMI_SOURCE_DIR`` (a copy, never the system's files).

1. ``PropertyCollector.Fetch`` of an unset property (``vm.snapshot`` before any snapshot,
   which pyvmomi reads lazily as one Fetch) indexes an empty ``MissingSet`` and panics, so the
   HTTP connection drops. vCenter answers with an empty value. Fixed upstream in 0.36.
2. ``RevertToSnapshot_Task``/``RemoveSnapshot_Task`` name the snapshot as the task's
   ``entity``; pyvmomi types ``TaskInfo.entity`` as a ``ManagedEntity`` (a snapshot is not one)
   and ``WaitForTask`` raises ``TypeError``. vCenter names the VM. Fixed upstream in 0.25.

Each edit is an exact text replacement that must match once; a mismatch (another govmomi
version) fails the build loudly instead of building an unpatched simulator. Re-running on an
already patched tree is a no-op.
"""

from __future__ import annotations

import sys
from pathlib import Path

EDITS = {
    "simulator/property_collector.go": [
        (
            "\tif len(obj.PropSet) == 0 {\n\t\tfault := obj.MissingSet[0].Fault",
            "\tif len(obj.PropSet) == 0 {\n"
            "\t\tif len(obj.MissingSet) == 0 { // vmenv patch: unset property, empty value\n"
            "\t\t\tbody.Res = new(internal.FetchResponse)\n"
            "\t\t\treturn body\n"
            "\t\t}\n"
            "\t\tfault := obj.MissingSet[0].Fault",
        )
    ],
    "simulator/snapshot.go": [
        (
            'task := CreateTask(v, "removeSnapshot",',
            'task := CreateTask(v.Vm, "removeSnapshot", // vmenv patch: entity is the VM\n\t\t',
        ),
        (
            'task := CreateTask(v, "revertToSnapshot",',
            'task := CreateTask(v.Vm, "revertToSnapshot", // vmenv patch: entity is the VM\n\t\t',
        ),
    ],
}


def main(root: Path) -> int:
    for rel, edits in EDITS.items():
        path = root / rel
        text = path.read_text()
        for old, new in edits:
            if new in text:
                continue
            if text.count(old) != 1:
                print(
                    f"patch_govmomi: {rel}: expected text not found once: {old!r}", file=sys.stderr
                )
                return 1
            text = text.replace(old, new)
        path.write_text(text)
    print(f"patch_govmomi: patched {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
