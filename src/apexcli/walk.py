"""Recursive globs (``'DIR/**/*.png'``) that never follow a symlink to a folder.

The standard library's ``glob`` follows them: a link back to a parent folder repeats every
image below it once per lap (one loop scored each image 41 times) and two such links never
finish. Here ``**`` descends into real folders only, each (device, inode) once per pattern
part, and the symlinked folders it passes are returned apart, for the caller to list as
skipped. Other parts match as ``glob`` matches them (``fnmatch``, hidden names only for a
part that starts with a dot).
"""

from __future__ import annotations

import fnmatch
import glob
import os


def _entries(folder: str) -> list[str]:
    """The names in ``folder`` ('' = the working folder), sorted; none when it cannot be read."""
    try:
        return sorted(os.listdir(folder or os.curdir))
    except OSError:
        return []


def _join(base: str, name: str) -> str:
    return os.path.join(base, name) if base else name


def _is_real_folder(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _split(pattern: str) -> tuple[str, list[str]]:
    """``'/a/**/b'`` -> (``'/'``, ``['a', '**', 'b']``); a relative pattern starts at ''."""
    anchor = os.sep if pattern.startswith(os.sep) else ""
    return anchor, [part for part in pattern.split(os.sep) if part]


def recursive_glob(pattern: str) -> tuple[list[str], list[str]]:
    """(paths matching ``pattern``, symlinked folders that ``**`` did not enter), both sorted."""
    anchor, parts = _split(pattern)
    matches: set[str] = set()
    unfollowed: set[str] = set()
    seen: set[tuple[object, int]] = set()
    stack: list[tuple[str, int]] = [(anchor, 0)]
    while stack:
        base, i = stack.pop()
        key: object = base
        if i < len(parts) and parts[i] == "**":
            try:  # a folder reached twice (a bind mount, "**/**") is walked once
                st = os.stat(base or os.curdir)
                key = (st.st_dev, st.st_ino)
            except OSError:
                pass
        if (key, i) in seen:
            continue
        seen.add((key, i))
        if i == len(parts):
            if base:
                matches.add(base)
            continue
        part, last = parts[i], i + 1 == len(parts)
        if part == "**":
            stack.append((base, i + 1))  # ** matching no folder at all
            for name in _entries(base):
                child = _join(base, name)
                if name.startswith("."):
                    continue
                if _is_real_folder(child):
                    stack.append((child, i))
                elif os.path.isdir(child):
                    unfollowed.add(child)
                    if last:
                        matches.add(child)
                elif last:
                    matches.add(child)
        elif glob.has_magic(part):
            for name in _entries(base):
                if name.startswith(".") and not part.startswith("."):
                    continue
                if fnmatch.fnmatch(name, part):
                    child = _join(base, name)
                    if last:
                        matches.add(child)
                    elif os.path.isdir(child):
                        stack.append((child, i + 1))
        else:
            child = _join(base, part)
            if last and os.path.lexists(child):
                matches.add(child)
            elif not last and os.path.isdir(child):
                stack.append((child, i + 1))
    return sorted(matches), sorted(unfollowed - matches)
