"""Writers under SIGKILL and concurrency: nothing finished-looking is left, reruns succeed,
and two writers of one destination never both succeed.

Each command runs in its own process (``python -m qpdeploy.cli``) on tiny models. A first,
complete run gives the command's duration D; then the command is killed with SIGKILL at
seeded random moments in [0.15 D, 0.9 D], which fall in imports, model loading, the work
and the final writes (7 kills in all). After every kill the destination must not exist and every leftover
beside it must be marked unfinished (readers refuse it); a rerun must succeed and clear the
leftovers.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpdeploy.io import INCOMPLETE_MARKER, claim_output

from .conftest import write_images

QUICK = ["--calib-steps", "2", "--calib-samples", "4", "--device", "cpu"]
KILLS = {"quantize": 2, "train": 2, "export": 2, "generate": 1}


def command(name: str, out: Path, art: dict) -> list[str]:
    args = {
        "quantize": ["quantize", "tiny-sd1", "--out", str(out), *QUICK],
        "train": ["train", "--base", str(art["base"]), "--images", str(art["images"]), "--prompt", "a photo of sks dog",
                  "--steps", "6", "--checkpoint-every", "2", "--out", str(out), "--device", "cpu"],
        "export": ["export", "--base", str(art["base"]), "--pack", str(art["pack"]), "--out", str(out)],
        "generate": ["generate", str(art["deploy"]), "--prompt", "a sks dog", "--steps", "4", "--out", str(out)],
    }[name]
    return [sys.executable, "-m", "qpdeploy.cli", *args]


def run(cmd, kill_after: float | None = None) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    return proc.returncode, output, time.perf_counter() - start


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    images = write_images(root / "images")
    steps = {"base": ["quantize", "tiny-sd1", "--out", str(root / "base"), *QUICK],
             "pack": ["train", "--base", str(root / "base"), "--images", str(images), "--prompt", "a photo of sks dog",
                      "--steps", "2", "--out", str(root / "pack"), "--device", "cpu"],
             "deploy": ["export", "--base", str(root / "base"), "--pack", str(root / "pack"), "--out",
                        str(root / "deploy"), "--no-verify"]}
    for args in steps.values():
        code, output, _ = run([sys.executable, "-m", "qpdeploy.cli", *args])
        assert code == 0, output
    return {"root": root, "images": images, **{k: root / k for k in steps}}


def check_whole(name: str, out: Path) -> None:
    """Read ``out`` with its reader and every hash check on."""
    from PIL import Image

    from qpdeploy.base import load_base
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.pack import load_pack

    readers = {"quantize": load_base, "train": load_pack, "export": lambda p: read_manifest(p, verify_hashes=True),
               "generate": lambda p: Image.open(p).load()}
    readers[name](out)


def leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_leaves_nothing_finished_looking_and_the_rerun_succeeds(art, tmp_path, name):
    suffix = ".png" if name == "generate" else ""
    code, output, duration = run(command(name, tmp_path / f"reference{suffix}", art))
    assert code == 0, output
    rng = random.Random(f"kill-{name}")
    out = tmp_path / f"out{suffix}"
    kills = attempts = 0
    while kills < KILLS[name] and attempts < 3 * KILLS[name]:  # a run that beat its signal is tried again
        attempts += 1
        code, output, _ = run(command(name, out, art), kill_after=rng.uniform(0.15, 0.9) * duration)
        assert code in (0, -signal.SIGKILL), output
        kills += code == -signal.SIGKILL
        if out.exists():  # finished before the signal (or killed after the final rename): it must be whole
            check_whole(name, out)
            out.unlink() if out.is_file() else shutil.rmtree(out)
        for path in leftovers(out):  # a lock file, or temporary copies readers refuse
            assert path.name.endswith(".lock") or (path.is_dir() and (path / INCOMPLETE_MARKER).exists()) \
                or (path.is_file() and ".tmp-" in path.name), path
    assert kills == KILLS[name]
    code, output, _ = run(command(name, out, art))
    assert code == 0, output
    assert out.exists() and leftovers(out) == []


@pytest.mark.slow
def test_two_concurrent_exports_to_one_destination_never_both_succeed(art, tmp_path):
    from qpdeploy.exporters.manifest import read_manifest

    out = tmp_path / "deploy"
    procs = [subprocess.Popen(command("export", out, art), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    results = [(p.wait(), p.communicate()[0]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(output for code, output in results if code == 2)
    assert "is writing" in loser or "already exists" in loser, loser
    read_manifest(out, verify_hashes=True)  # the winner's deploy dir is whole


@pytest.mark.slow
def test_a_second_writer_fails_while_the_first_holds_the_destination(tmp_path):
    out = tmp_path / "base"
    with claim_output(out, force=False):
        code, output, _ = run([sys.executable, "-m", "qpdeploy.cli", "quantize", "tiny-sd1", "--out", str(out), *QUICK])
    assert code == 2
    assert output.strip().splitlines()[-1] == (f"error: another qpdeploy process (pid {os.getpid()}) is writing "
                                               f"{out}; wait for it to finish")
    assert not out.exists() and leftovers(out) == []


def test_a_destination_that_appears_meanwhile_is_never_replaced(tmp_path):
    from qpdeploy.errors import QPDeployError
    from qpdeploy.io import atomic_dir

    out = tmp_path / "pack"
    with pytest.raises(QPDeployError, match="appeared while this run was writing it; it was left as it is"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "ours.txt").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert leftovers(out) == []
