"""Builds the native gRPC client library from net.cc against the system's gRPC C++.

    python -m router.native.build [--out DIR] [--bundle] [--if-available]

It needs a C++17 compiler, pkg-config and gRPC C++'s development files (Debian: `apt-get install
g++ pkg-config libgrpc++-dev`). --bundle copies the shared libraries it links (gRPC, abseil,
re2, c-ares, OpenSSL, zlib; not glibc or libstdc++) next to it; the library finds them there
(its rpath is its own folder), so the folder runs on a machine without gRPC C++ whose glibc
and libstdc++ are at least as new. --if-available: exit 0 without building where gRPC C++ is
missing (`./run setup`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from router.native import LIB_NAME

SOURCE = Path(__file__).with_name("net.cc")
DEFAULT_OUT = Path(__file__).with_name("build")
# provided by the system everywhere the library runs
_SYSTEM_LIBS = ("libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "ld-linux", "linux-vdso")


def grpc_flags() -> list[str] | None:
    """pkg-config's compile and link flags for grpc++, or None where it is not installed."""
    if shutil.which("pkg-config") is None:
        return None
    done = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True
    )
    return done.stdout.split() if done.returncode == 0 else None


def build(out: Path, flags: list[str]) -> Path | None:
    """-> the library built, None when the one in out is newer than the source already."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / LIB_NAME
    if target.exists() and target.stat().st_mtime > SOURCE.stat().st_mtime:
        return None
    partial = out / f".{LIB_NAME}.partial"
    command = [
        "g++", "-std=c++17", "-O2", "-g0", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
        str(SOURCE), *flags, "-Wl,--disable-new-dtags,-rpath,$ORIGIN", "-o", str(partial),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    partial.replace(target)  # atomic: a reader sees the old library or the new one
    return target


def bundle(library: Path) -> list[Path]:
    """Copies the non-system libraries that `library` links into its folder -> the copies."""
    listing = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True)
    copied = []
    for line in listing.stdout.splitlines():
        parts = line.split("=>")
        if len(parts) != 2 or not parts[1].strip().startswith("/"):
            continue
        name, path = parts[0].strip(), Path(parts[1].split()[0])
        if name.startswith(_SYSTEM_LIBS):
            continue
        copy = library.parent / name
        shutil.copyfile(path.resolve(), copy)
        copied.append(copy)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--bundle", action="store_true", help="copy the linked libraries too")
    parser.add_argument("--if-available", action="store_true", help="skip quietly without gRPC C++")
    args = parser.parse_args(argv)
    flags = grpc_flags()
    if flags is None or shutil.which("g++") is None:
        if args.if_available:
            return 0
        print(
            "gRPC C++ is not installed (pkg-config finds no grpc++) or g++ is missing: "
            "install g++ pkg-config libgrpc++-dev",
            file=sys.stderr,
        )
        return 1
    library = build(args.out, flags)
    if library is None and not args.bundle:
        return 0
    library = library or args.out / LIB_NAME
    copies = bundle(library) if args.bundle else []
    print(f"built {library}" + (f" with {len(copies)} libraries beside it" if copies else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
