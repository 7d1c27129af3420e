"""Builds keras_dp's wheel and sdist and trains from the installed wheel.

`make wheel-test` (run by `make test`) runs this script with the dev
venv's Python. It

1. copies the source tree (the files git tracks, plus untracked files git
   does not ignore) into a temporary folder and builds the sdist, then the
   wheel from the sdist, with `python -m build` there: a stale
   `*.egg-info` or `build/` in the checkout cannot leak into the
   archives, and the build writes nothing into the checkout;
2. runs `twine check --strict` on both, and checks that both hold every
   module of keras_dp and the native kernels' sources
   (`keras_dp/native/*.h`, `*.cc`), the wheel its LICENSE, the sdist the
   LICENSE and README;
3. creates a fresh virtual environment and installs the wheel into it with
   `pip install --no-deps`. To keep this fast, the fresh venv reuses the
   dev venv's installed dependencies (TensorFlow, JAX, Keras, ...)
   through a `.pth` file that lists the dev venv's site-packages: a plain
   path in a `.pth` file is appended to `sys.path`, but the `.pth` files
   inside that folder (the editable install's import hook among them) are
   not run, so the checkout's keras_dp stays invisible. The script checks
   that: keras_dp must not be importable in the fresh venv before the
   wheel is installed. As `--no-deps` skips pip's dependency resolution,
   the script then checks that the wheel's declared requirements (and
   those of its `tensorflow`, `jax` and `torch` extras, recursively) are installed
   at versions that satisfy them (`pip check` would also report the dev
   venv's own unrelated gaps, such as keras-hub's dependencies, which
   `make venv` installs with `--no-deps` on purpose);
4. for each backend (TensorFlow, JAX and PyTorch, at once), from a temporary
   working directory outside the repository and with `python -I` (no
   PYTHONPATH, no user site, no script folder on `sys.path`), makes a
   small Dense model private, trains one DP-SGD step with `model.fit`,
   and checks that keras_dp was imported from the fresh venv and that
   its native kernel was compiled from the installed package's sources
   into an empty `KERAS_DP_CACHE_DIR` and loaded.

Usage: python tools/wheel_smoke.py [--outdir DIR] [--keep]
"""

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax", "torch")
EXTRAS = ("tensorflow", "jax", "torch")
NATIVE_SOURCES = (
    "noise.h",
    "chunks.h",
    "conv_grads.h",
    "jax_ffi.cc",
    "tf_ops.cc",
    "c_api.cc",
)


class SmokeFailure(Exception):
    pass


_START = time.monotonic()


def _log(message):
    print(f"wheel-test [{time.monotonic() - _START:4.0f} s]: {message}", flush=True)


def _run(what, command, **kwargs):
    """Runs `command`; raises SmokeFailure naming `what` (with the output)
    if it fails. Returns the completed process (output captured)."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise SmokeFailure(
            f"{what} failed (exit {result.returncode}): "
            f"`{' '.join(map(str, command))}`\n{output[-4000:]}"
        )
    return result


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


# 1. Build ----------------------------------------------------------------


def _copy_source_tree(destination):
    """Copies what a clean checkout of the working tree holds."""
    try:
        listing = subprocess.run(
            ["git", "-C", REPO, "ls-files", "-z", "--cached", "--others"]
            + ["--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        listing = None
    if listing is None:  # not a git checkout: the tree less build outputs
        shutil.copytree(
            REPO,
            destination,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__"
            ),
        )
        return
    for name in listing.split("\0"):
        source = os.path.join(REPO, name)
        if name and os.path.isfile(source):  # skips deleted tracked files
            target = os.path.join(destination, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(source, target)


def build(workdir, outdir):
    source = os.path.join(workdir, "source")
    _copy_source_tree(source)
    _run(
        "building the sdist and wheel (python -m build)",
        [sys.executable, "-m", "build", "--outdir", outdir, source],
    )
    wheels = [f for f in os.listdir(outdir) if f.endswith(".whl")]
    sdists = [f for f in os.listdir(outdir) if f.endswith(".tar.gz")]
    if len(wheels) != 1 or len(sdists) != 1:
        raise SmokeFailure(
            f"expected one wheel and one sdist in {outdir}, found "
            f"{sorted(os.listdir(outdir))}"
        )
    return source, os.path.join(outdir, wheels[0]), os.path.join(outdir, sdists[0])


# 2. Check the archives ---------------------------------------------------


def _package_files(source):
    """The package's modules and native sources in the source tree."""
    names = []
    for folder, _, files in os.walk(os.path.join(source, "keras_dp")):
        for name in files:
            if name.endswith((".py", ".h", ".cc")):
                path = os.path.join(folder, name)
                names.append(os.path.relpath(path, source).replace(os.sep, "/"))
    return names


def check_archives(source, wheel, sdist):
    _run(
        "twine check",
        [sys.executable, "-m", "twine", "check", "--strict", wheel, sdist],
    )
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = set(archive.namelist())
    dist_info = next(n.split("/")[0] for n in wheel_names if ".dist-info/" in n)
    expected = [f"keras_dp/native/{name}" for name in NATIVE_SOURCES]
    expected += _package_files(source)
    expected += [
        f"{dist_info}/licenses/LICENSE",
        f"{dist_info}/METADATA",
    ]
    missing = [name for name in expected if name not in wheel_names]
    if missing:
        raise SmokeFailure(f"the wheel {wheel} lacks {missing}")
    stray = [n for n in wheel_names if "__pycache__" in n or n.startswith("tests/")]
    if stray:
        raise SmokeFailure(f"the wheel {wheel} holds files it should not: {stray}")

    with tarfile.open(sdist) as archive:
        sdist_names = {name.split("/", 1)[-1] for name in archive.getnames()}
    expected = [f"keras_dp/native/{name}" for name in NATIVE_SOURCES]
    expected += _package_files(source)
    expected += ["LICENSE", "README.md", "pyproject.toml", "PKG-INFO"]
    missing = [name for name in expected if name not in sdist_names]
    if missing:
        raise SmokeFailure(f"the sdist {sdist} lacks {missing}")


# 3. The fresh venv --------------------------------------------------------

_CHECK_REQUIREMENTS = """
import importlib.metadata as md
import os
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

prefix = sys.argv[1]
extras = sys.argv[2:]
dist = md.distribution("keras-dp")
where = os.path.realpath(str(dist.locate_file("")))
if os.path.commonpath([where, prefix]) != prefix:
    sys.exit(f"the keras-dp metadata found first is in {where}, not {prefix}")

problems, seen = [], set()


def check(dist, extras, chain):
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": e}) for e in [""] + list(extras)
        ):
            continue
        try:
            found = md.distribution(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{chain} requires {req}, which is not installed")
            continue
        if not req.specifier.contains(found.version, prereleases=True):
            problems.append(
                f"{chain} requires {req}, but {found.version} is installed"
            )
            continue
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key not in seen:  # each distribution's own requirements once
            seen.add(key)
            check(found, req.extras, f"{chain} -> {req.name}")


check(dist, extras, f"keras-dp[{','.join(extras)}]")
if problems:
    sys.exit("unsatisfied requirements:\\n  " + "\\n  ".join(problems))
print(f"{len(seen)} distributions' requirements (recursively) satisfied")
"""


def _purelib(python):
    return _run(
        f"asking {python} for its site-packages",
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
    ).stdout.strip()


def fresh_venv(workdir, wheel):
    """Creates the venv, installs the wheel; returns the venv's Python."""
    venv = os.path.join(workdir, "fresh-venv")
    _run(
        "creating the fresh venv", [sys.executable, "-m", "venv", "--without-pip", venv]
    )
    python = os.path.join(venv, "bin", "python")
    site = _purelib(python)
    dev_paths = []
    for key in ("purelib", "platlib"):
        path = sysconfig.get_path(key)
        if path not in dev_paths:
            dev_paths.append(path)
    with open(os.path.join(site, "keras_dp_dev_dependencies.pth"), "w") as f:
        f.write("".join(path + "\n" for path in dev_paths))

    probe = _run(
        "importing keras_dp in the fresh venv before the install",
        [
            python,
            "-I",
            "-c",
            "import importlib.util as u; print(u.find_spec('keras_dp'))",
        ],
        cwd=workdir,
    ).stdout.strip()
    if probe != "None":
        raise SmokeFailure(
            "keras_dp is importable in the fresh venv before the wheel is "
            f"installed ({probe}): the dev venv's editable install leaks "
            "through the .pth file, so this test would not test the wheel"
        )

    _run(
        "installing the wheel into the fresh venv",
        [sys.executable, "-m", "pip", "--python", python, "install"]
        + ["--no-deps", "--no-index", "--disable-pip-version-check", wheel],
    )
    script = os.path.join(workdir, "check_requirements.py")
    with open(script, "w") as f:
        f.write(_CHECK_REQUIREMENTS)
    result = _run(
        "checking the wheel's declared requirements in the fresh venv",
        [python, "-I", script, os.path.realpath(venv)] + list(EXTRAS),
        cwd=workdir,
    )
    _log(f"wheel requirements: {result.stdout.strip()}")
    return python, venv


# 4. One private step per backend ------------------------------------------

_TRAIN_STEP = """
import glob
import os
import subprocess
import sys

venv, backend = sys.argv[1], sys.argv[2]


def fail(message):
    sys.exit(f"[{backend}] {message}")


def inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


# Records the native build's compiler command (keras_dp.native.build runs
# the compiler through subprocess.run).
builds = []
_subprocess_run = subprocess.run


def _recording_run(args, *rest, **kwargs):
    if isinstance(args, (list, tuple)) and "-shared" in args:
        builds.append([str(a) for a in args])
    return _subprocess_run(args, *rest, **kwargs)


subprocess.run = _recording_run

import numpy as np  # noqa: E402

import keras  # noqa: E402
import keras_dp  # noqa: E402
import keras_dp.native as native  # noqa: E402

if not inside(sys.prefix, venv):
    fail(f"runs in {sys.prefix}, not in the fresh venv {venv}")
if not inside(keras_dp.__file__, venv):
    fail(f"keras_dp was imported from {keras_dp.__file__}, not the fresh venv")
if keras.backend.backend() != backend:
    fail(f"Keras runs on {keras.backend.backend()}")
source_dir = os.path.dirname(native.__file__)
reported = getattr(native, "_SOURCE_DIR", source_dir)
for folder in (source_dir, reported):
    if not inside(folder, venv):
        fail(f"keras_dp.native's source dir {folder} is not in the fresh venv")
missing = [
    name
    for name in ("noise.h", "chunks.h", "conv_grads.h", "jax_ffi.cc", "tf_ops.cc", "c_api.cc")
    if not os.path.isfile(os.path.join(reported, name))
]
if missing:
    fail(f"the installed package lacks the native sources {missing}")
cache = native.cache_dir()
if not inside(cache, os.environ["KERAS_DP_CACHE_DIR"]):
    fail(f"the kernel cache {cache} is not under KERAS_DP_CACHE_DIR")
if glob.glob(os.path.join(cache, "*")):
    fail(f"the kernel cache {cache} is not empty before the step")

rng = np.random.default_rng(0)
x = rng.normal(size=(8, 4)).astype("float32")
y = rng.integers(0, 3, size=(8,))
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
model = keras_dp.make_private(model)
model.compile(
    optimizer=keras_dp.DPSGD(
        learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0, seed=0
    ),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
before = [np.array(w) for w in model.get_weights()]
history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
loss = history.history["loss"][-1]
if not np.isfinite(loss):
    fail(f"the private step's loss is {loss}")
after = model.get_weights()
if all(np.array_equal(b, a) for b, a in zip(before, after)):
    fail("the private step left the weights unchanged")

libraries = glob.glob(os.path.join(cache, "*.so"))
if not libraries:
    fail(
        f"no native kernel library in {cache} after the step: keras_dp did "
        "not build it (see its warning above, if any)"
    )
if not builds:
    fail(
        "no compiler command was recorded, yet the cache holds "
        f"{libraries}: has keras_dp.native.build stopped using subprocess.run?"
    )
for command in builds:
    sources = [a for a in command if a.endswith(".cc")]
    includes = [command[i + 1] for i, a in enumerate(command[:-1]) if a == "-I"]
    if not sources or not all(inside(s, reported) for s in sources):
        fail(f"the kernel was compiled from {sources}, not from {reported}")
    if reported not in includes:
        fail(f"the kernel build does not include {reported}: {command}")
    if any(os.environ["KERAS_DP_CHECKOUT"] in a for a in command):
        fail(f"the kernel build reads the checkout's sources: {command}")
count = len(builds)
if backend == "tensorflow":
    loaded = native.tensorflow_ops()
elif backend == "torch":
    loaded = native.c_api()
else:
    loaded = native.jax_target()
if loaded is None:
    fail("keras_dp.native reports its kernel as not loaded after the step")
if len(builds) != count:
    fail("the kernel was built only after the step, not by it")
print(
    f"[{backend}] one private step from {os.path.dirname(keras_dp.__file__)} "
    f"(loss {loss:.3f}); kernel built from the installed sources: "
    f"{', '.join(os.path.basename(p) for p in libraries)}"
)
"""


def train_steps(workdir, python, venv):
    script = os.path.join(workdir, "train_step.py")
    with open(script, "w") as f:
        f.write(_TRAIN_STEP)
    runs = {}
    for backend in BACKENDS:
        cache = os.path.join(workdir, f"cache-{backend}")
        os.makedirs(cache)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "PYTHONPATH")
        }
        env.update(
            KERAS_BACKEND=backend,
            KERAS_DP_CACHE_DIR=cache,
            KERAS_DP_NATIVE="1",
            # The checkout's package, which the build must not read.
            KERAS_DP_CHECKOUT=os.path.join(REPO, "keras_dp"),
            # The kernel is a CPU kernel: keep both frameworks on the CPU.
            JAX_PLATFORMS="cpu",
            CUDA_VISIBLE_DEVICES="",
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        runs[backend] = subprocess.Popen(
            [python, "-I", script, os.path.realpath(venv), backend],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    failures = []
    for backend, process in runs.items():
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            failures.append(
                f"the private step on {backend} from the installed wheel failed "
                f"(exit {process.returncode}):\n{(stdout + stderr).strip()[-4000:]}"
            )
        else:
            _log(stdout.strip().splitlines()[-1])
    if failures:
        raise SmokeFailure("\n\n".join(failures))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--outdir",
        help="where to put the wheel and sdist (default: a temporary folder)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (printed)"
    )
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="keras_dp-wheel-smoke-")
    try:
        if _inside(workdir, REPO):
            raise SmokeFailure(
                f"the temporary folder {workdir} is inside the repository; "
                "set TMPDIR to a folder outside it"
            )
        outdir = os.path.abspath(args.outdir or os.path.join(workdir, "dist"))
        if os.path.isdir(outdir) and os.listdir(outdir):
            raise SmokeFailure(f"--outdir {outdir} is not empty")
        os.makedirs(outdir, exist_ok=True)
        source, wheel, sdist = build(workdir, outdir)
        _log(f"built {os.path.basename(wheel)} and {os.path.basename(sdist)}")
        check_archives(source, wheel, sdist)
        _log("twine check passed; wheel and sdist hold the native sources")
        python, venv = fresh_venv(workdir, wheel)
        _log(f"installed the wheel into a fresh venv ({venv})")
        train_steps(workdir, python, venv)
    except SmokeFailure as failure:
        print(f"wheel-test FAILED: {failure}", file=sys.stderr)
        if args.keep:
            print(f"wheel-test: kept {workdir}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    kept = f"; kept {workdir}" if args.keep else ""
    _log(f"passed{kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
