"""Create a fresh virtual environment that also sees this interpreter's installed packages.

    python scripts/venv_overlay.py DIR

The new environment has its own (empty) site-packages, searched first, so what is installed into it
wins; after it come the site directories of the interpreter that ran this script, in that
interpreter's order, with their .pth files processed: torch, transformers, pip and the rest are
visible without being downloaded again.

Why not venv.create(..., system_site_packages=True): run from inside a virtual environment, venv
builds the new one on the *base* installation, so the calling venv's packages are invisible. The
site directories written here are the caller's own, from a venv, the system Python or conda alike.
No pip is installed into DIR (ensurepip is missing from some system Pythons): `DIR/bin/python -m pip`
runs the caller's pip, which installs into DIR.
"""
import os
import site
import subprocess
import sys
import venv

PTH = "_kseed_overlay.pth"


def caller_site_dirs():
    """This interpreter's site directories (user site first where enabled), in sys.path order."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    wanted = {os.path.realpath(d) for d in dirs if os.path.isdir(d)}
    out = []
    for p in sys.path:
        real = os.path.realpath(p) if p else ""
        if real in wanted and real not in out:
            out.append(real)
    return out


def create(target):
    target = os.path.abspath(target)
    venv.create(target, with_pip=False, clear=True, symlinks=os.name != "nt")
    env_py = os.path.join(target, "Scripts" if os.name == "nt" else "bin", "python")
    # The new environment's own site-packages, as its interpreter names it (-I: no PYTHONPATH, no
    # user site).
    own = subprocess.run([env_py, "-I", "-c", "import site; print(site.getsitepackages()[0])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    dirs = caller_site_dirs()
    # One `import` line: site runs it at start-up. addsitedir appends each directory to sys.path
    # (after the new environment's own site-packages) and processes its .pth files, as the caller's
    # start-up did.
    line = f"import site; list(map(site.addsitedir, {dirs!r}))\n"
    with open(os.path.join(own, PTH), "w") as f:
        f.write(line)
    return target, dirs


def main(argv):
    if len(argv) != 1:
        sys.exit("usage: python scripts/venv_overlay.py DIR")
    target, dirs = create(argv[0])
    print(f"venv_overlay: {target} sees {len(dirs)} site dir(s) of {sys.executable}: {', '.join(dirs)}")


if __name__ == "__main__":
    main(sys.argv[1:])
