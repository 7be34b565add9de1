"""Bad input over every command, as a careless or hostile user would give it.

Each case must end with exit code 2, exactly one ``error:`` line on stderr naming the
problem, no traceback, and every input directory byte-identical before and after (inputs
are never touched, even with ``--force``). Artifacts edited by hand are copies made per
case, so the shared ones stay intact and are checked too.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpdeploy.cli import app
from qpdeploy.io import INCOMPLETE_MARKER, file_sha256

runner = CliRunner()
QUICK = ["--calib-steps", "2", "--calib-samples", "4", "--device", "cpu"]
NOT_UTF8 = "a sks \udcff dog"  # what Python makes of the byte 0xff in a command-line argument
OTHER_HASH = "ab" * 32


@pytest.fixture(scope="module")
def art(cheap_saved_base, tmp_path_factory):
    """A tiny base, a pack trained 2 steps, its deploy dir and an image folder (shared, read-only)."""
    from qpdeploy.config import TrainConfig
    from qpdeploy.exporters.config import ExportConfig
    from qpdeploy.exporters.export import export_from_paths
    from qpdeploy.train import train

    from .conftest import write_images

    root = tmp_path_factory.mktemp("bad-input")
    base = cheap_saved_base("sd1")
    images = write_images(root / "images")
    pack, _ = train(base, images, root / "pack", TrainConfig(prompt="a photo of sks dog", steps=2), device="cpu")
    deploy, _ = export_from_paths(base, pack, root / "deploy", ExportConfig(verify=False))
    (root / "a-file").write_text("not a folder")
    (root / "empty").mkdir()
    return {"base": Path(base), "pack": pack, "deploy": deploy, "images": images, "root": root}


def copy_of(art, tmp_path, name: str) -> Path:
    """A private copy of a shared artifact, for a case that edits it."""
    return Path(shutil.copytree(art[name], tmp_path / f"{name}-copy"))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_manifest(deploy: Path, change, rehash: tuple[str, ...] = ()) -> None:
    """Change manifest.json; files named in ``rehash`` get their table entry recomputed, so
    only the edited thing is wrong."""
    def apply(data):
        change(data)
        for name in rehash:
            data["files"][name] = {"bytes": (deploy / name).stat().st_size, "sha256": file_sha256(deploy / name)}
    edit_json(deploy / "manifest.json", apply)


def tree_digest(folder: Path) -> str:
    """SHA-256 over every path, link target and file's bytes under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Preparations of edited copies: each returns the path the case uses as {x}
# --------------------------------------------------------------------------------------

def edited(name: str, edit):
    """A preparation: a private copy of the shared artifact ``name`` changed by ``edit(path)``."""
    def prepare(art, tmp):
        path = copy_of(art, tmp, name)
        edit(path)
        return path
    return prepare


def header(file: str, change):
    """An edit of the JSON file ``file`` of an artifact (the manifest: see :func:`edit_manifest`)."""
    if file == "manifest.json":
        return lambda path: edit_manifest(path, change)
    return lambda path: edit_json(path / file, change)


def flip_byte(file: str, offset: int):
    def edit(path):
        data = bytearray((path / file).read_bytes())
        data[offset] ^= 1
        (path / file).write_bytes(bytes(data))
    return edit


def link_weights_outside(deploy: Path) -> None:
    outside = deploy.parent / "outside.weights"
    shutil.copy(deploy / "unet.weights", outside)
    (deploy / "unet.weights").unlink()
    (deploy / "unet.weights").symlink_to(outside)


def not_a_scheduler(deploy: Path) -> None:
    edit_json(deploy / "scheduler" / "scheduler_config.json", lambda d: d.update(_class_name="UNet2DConditionModel"))
    edit_manifest(deploy, lambda d: None, rehash=("scheduler/scheduler_config.json",))  # only the class is wrong


PASSWD = {"bytes": Path("/etc/passwd").stat().st_size, "sha256": file_sha256("/etc/passwd")}
base_layers_not_a_list = edited("base", header("quant_config.json", lambda d: d.update(layers="x")))
base_bits_as_string = edited("base", header("quant_config.json", lambda d: d["quantize"].update(weight_bits="8")))
base_hash_edited = edited("base", header("quant_config.json", lambda d: d.update(base_hash=OTHER_HASH)))
base_unfinished = edited("base", lambda path: (path / INCOMPLETE_MARKER).touch())
pack_s1_as_string = edited("pack", header("pack.json", lambda d: d.update(s1_intervals="01")))
pack_unknown_strategy = edited("pack", header("pack.json", lambda d: d.update(strategy="s9")))
pack_scales_replaced = edited("pack", flip_byte("scales.safetensors", -1))
pack_of_other_base = edited("pack", header("pack.json", lambda d: d.update(base_hash=OTHER_HASH)))
files_entry_outside = edited("deploy", header("manifest.json", lambda d: d["files"].update({"../../etc/passwd": PASSWD})))
scheduler_outside = edited("deploy", header("manifest.json", lambda d: d.update(scheduler="../../scheduler")))
weights_link_outside = edited("deploy", link_weights_outside)
weights_not_listed = edited("deploy", header("manifest.json", lambda d: d["files"].pop("unet.weights")))
tokenizer_file_not_listed = edited("deploy", lambda path: (path / "tokenizer" / "added_tokens.json").write_text("{}"))
height_as_string = edited("deploy", header("manifest.json", lambda d: d.update(height="16")))
scheduler_not_a_scheduler = edited("deploy", not_a_scheduler)
deploy_file_altered = edited("deploy", flip_byte("unet.weights", 100))
deploy_unfinished = edited("deploy", lambda path: (path / INCOMPLETE_MARKER).touch())


def graph_path(value):
    return edited("deploy", header("manifest.json", lambda d: d["unet"]["graphs"][0].update(onnx=value)))


def weights_path(value):
    return edited("deploy", header("manifest.json", lambda d: d["unet"].update(weights_file=value)))


def image_file_not_image(art, tmp):
    folder = tmp / "broken-images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG broken")
    return folder


def images_with_small_masks(art, tmp):
    """A copy of the images whose masks are 4x4 (the images are larger)."""
    from PIL import Image

    folder = Path(shutil.copytree(art["images"], tmp / "masked"))
    (folder / "masks").mkdir()
    for image in sorted(art["images"].glob("*.png")):
        Image.new("L", (4, 4), 255).save(folder / "masks" / image.name)
    return folder


def prompt_file_not_utf8(art, tmp):
    path = tmp / "prompts.txt"
    path.write_bytes(b"a sks \xff dog\n")
    return path


TRAIN = ["train", "--base", "{base}", "--images", "{images}", "--prompt", "a photo of sks dog", "--steps", "1"]
EXPORT = ["export", "--base", "{base}", "--pack", "{pack}", "--no-verify"]
GENERATE = ["generate", "{deploy}", "--prompt", "a sks dog", "--steps", "2"]

# (id, arguments, expected words of the error line, preparation giving {x} or None)
CASES = [
    # quantize
    ("quantize-out-is-model", ["quantize", "{base}", "--out", "{base}", "--force"], "is the input", None),
    ("quantize-force-onto-images", ["quantize", "tiny-sd1", "--out", "{images}", "--force", *QUICK],
     "is not a qpdeploy.quantized-base artifact", None),
    ("quantize-force-onto-pack", ["quantize", "tiny-sd1", "--out", "{pack}", "--force", *QUICK],
     "is not a qpdeploy.quantized-base artifact", None),
    ("quantize-exists", ["quantize", "tiny-sd1", "--out", "{base}", *QUICK], "already exists", None),
    ("quantize-resolution-0", ["quantize", "tiny-sd1", "--out", "{tmp}/b", "--resolution", "0", *QUICK],
     "resolution must be in 1..8192, got 0", None),
    ("quantize-resolution-33", ["quantize", "tiny-sd1", "--out", "{tmp}/b", "--resolution", "33", *QUICK],
     "resolution must be a multiple of 4", None),
    ("quantize-resolution-huge", ["quantize", "tiny-sd1", "--out", "{tmp}/b", "--resolution", "100000", *QUICK],
     "resolution must be in 1..8192", None),
    ("quantize-resolution-over-model", ["quantize", "tiny-sd1", "--out", "{tmp}/b", "--resolution", "4096", *QUICK],
     "between 4 and 64", None),
    ("quantize-out-under-a-file", ["quantize", "tiny-sd1", "--out", "{root}/a-file/base", *QUICK],
     "is not a directory", None),
    ("quantize-intervals-0", ["quantize", "tiny-sd1", "--out", "{tmp}/b", "--intervals", "0", *QUICK],
     "intervals must be in 1..1000", None),
    ("quantize-calib-steps-huge", ["quantize", "tiny-sd1", "--out", "{tmp}/b", "--calib-steps", "5000"],
     "calibration steps must be in 2..1000", None),
    ("quantize-prompts-not-utf8", ["quantize", "tiny-sd1", "--out", "{tmp}/b", "--calib-prompts", "{x}", *QUICK],
     "cannot read prompt file", prompt_file_not_utf8),
    ("quantize-missing-model", ["quantize", "{tmp}/no-model", "--out", "{tmp}/b"], "model not found", None),
    # train
    ("train-out-is-images", [*TRAIN, "--out", "{images}", "--force"], "is the input", None),
    ("train-out-is-base", [*TRAIN, "--out", "{base}", "--force"], "is the input", None),
    ("train-out-inside-base", [*TRAIN, "--out", "{base}/pack"], "lies inside the input", None),
    ("train-out-contains-images", [*TRAIN, "--out", "{root}", "--force"], "contains the input", None),
    ("train-force-onto-deploy", [*TRAIN, "--out", "{deploy}", "--force"], "is not a qpdeploy.scale-pack", None),
    ("train-missing-images", ["train", "--base", "{base}", "--images", "{tmp}/none", "--prompt", "a sks dog",
                              "--out", "{tmp}/p"], "image folder not found", None),
    ("train-model-missing-images", ["train", "--model", "tiny-sd1", "--images", "{tmp}/none", "--prompt",
                                    "a sks dog", "--out", "{tmp}/p"], "image folder not found", None),
    ("train-token-two-words", [*TRAIN, "--train-token", "--identifier", "sks dog", "--out", "{tmp}/p"],
     "--train-token needs a one-word identifier", None),
    ("train-model-token-two-words", ["train", "--model", "tiny-sd1", "--images", "{images}", "--prompt", "a sks dog",
                                     "--train-token", "--identifier", "sks dog", "--out", "{tmp}/p"],
     "--train-token needs a one-word identifier", None),
    ("train-token-unknown-word", [*TRAIN, "--train-token", "--identifier", "qwzrt", "--out", "{tmp}/p"],
     "'qwzrt' is not in text_encoder's vocabulary", None),
    ("train-empty-images", ["train", "--base", "{base}", "--images", "{root}/empty", "--prompt", "a sks dog",
                            "--out", "{tmp}/p"], "no images in", None),
    ("train-images-is-file", ["train", "--base", "{base}", "--images", "{root}/a-file", "--prompt", "a sks dog",
                              "--out", "{tmp}/p"], "must be a folder of images", None),
    ("train-unreadable-images", ["train", "--base", "{base}", "--images", "{x}", "--prompt", "a sks dog",
                                 "--out", "{tmp}/p"], "no readable image", image_file_not_image),
    ("train-prompt-not-utf8", ["train", "--base", "{base}", "--images", "{images}", "--prompt", NOT_UTF8,
                               "--out", "{tmp}/p"], "--prompt is not valid UTF-8", None),
    ("train-resolution-huge", [*TRAIN, "--out", "{tmp}/p", "--resolution", "100000"],
     "resolution must be a multiple of 8 in 8..8192", None),
    ("train-resolution-over-model", [*TRAIN, "--out", "{tmp}/p", "--resolution", "1024"], "between 4 and 64", None),
    ("train-batch-huge", [*TRAIN, "--out", "{tmp}/p", "--batch-size", "1000"], "batch size must be in 1..64", None),
    ("train-strategy", [*TRAIN, "--out", "{tmp}/p", "--strategy", "s3"], "Invalid value for '--strategy': 's3' is not one of", None),
    ("train-s1-interval", [*TRAIN, "--out", "{tmp}/p", "--strategy", "s1", "--s1-intervals", "9"],
     "s1 intervals must be in", None),
    ("train-background-without-masks", [*TRAIN, "--out", "{tmp}/p", "--background-weight", "0.3"],
     "no subject mask for 00.png: expected", None),
    ("train-model-background-without-masks", ["train", "--model", "tiny-sd1", "--images", "{images}", "--prompt",
                                              "a sks dog", "--background-weight", "0.3", "--out", "{tmp}/p"],
     "no subject mask for 00.png: expected", None),
    ("train-background-mask-size", ["train", "--base", "{base}", "--images", "{x}", "--prompt", "a sks dog",
                                    "--background-weight", "0.3", "--out", "{tmp}/p"], "is 4x4, its image 24x20",
     images_with_small_masks),
    ("train-background-weight-range", [*TRAIN, "--out", "{tmp}/p", "--background-weight", "1.5"],
     "background weight must be in 0..1, got 1.5", None),
    ("train-base-is-pack", ["train", "--base", "{pack}", "--images", "{images}", "--prompt", "a sks dog",
                            "--out", "{tmp}/p"], "is not a qpdeploy quantized base", None),
    ("train-base-layers-wrong-type", ["train", "--base", "{x}", "--images", "{images}", "--prompt", "a sks dog",
                                      "--out", "{tmp}/p"], "layers must be an array, got 'x'", base_layers_not_a_list),
    ("train-base-bits-wrong-type", ["train", "--base", "{x}", "--images", "{images}", "--prompt", "a sks dog",
                                    "--out", "{tmp}/p"], "QuantizeConfig.weight_bits must be an integer",
     base_bits_as_string),
    ("train-base-unfinished", ["train", "--base", "{x}", "--images", "{images}", "--prompt", "a sks dog",
                               "--out", "{tmp}/p"], "is an unfinished quantized base", base_unfinished),
    # export
    ("export-out-is-base", [*EXPORT, "--out", "{base}", "--force"], "is the input", None),
    ("export-out-is-pack", [*EXPORT, "--out", "{pack}", "--force"], "is the input", None),
    ("export-out-inside-pack", [*EXPORT, "--out", "{pack}/deploy"], "lies inside the input", None),
    ("export-force-onto-images", [*EXPORT, "--out", "{images}", "--force"], "is not a qpdeploy.deploy", None),
    ("export-height-huge", [*EXPORT, "--out", "{tmp}/d", "--height", "100000"], "height must be a multiple of 4", None),
    ("export-batch-huge", [*EXPORT, "--out", "{tmp}/d", "--batch", "1000"], "batch must be in 1..64", None),
    ("export-layout", [*EXPORT, "--out", "{tmp}/d", "--layout", "per-step"], "'per-step' is not one of 'per-interval', 'masked', 'multi-expert'", None),
    ("export-opset", [*EXPORT, "--out", "{tmp}/d", "--opset", "5"], "opset must be in", None),
    ("export-pack-is-base", ["export", "--base", "{base}", "--pack", "{base}", "--out", "{tmp}/d"],
     "is not a qpdeploy scale pack", None),
    ("export-pack-s1-wrong-type", ["export", "--base", "{base}", "--pack", "{x}", "--out", "{tmp}/d"],
     "s1_intervals must be an array, got '01'", pack_s1_as_string),
    ("export-pack-strategy", ["export", "--base", "{base}", "--pack", "{x}", "--out", "{tmp}/d"],
     "unknown strategy 's9'", pack_unknown_strategy),
    ("export-pack-scales-replaced", ["export", "--base", "{base}", "--pack", "{x}", "--out", "{tmp}/d"],
     "does not match the hash", pack_scales_replaced),
    ("export-pack-other-base", ["export", "--base", "{base}", "--pack", "{x}", "--out", "{tmp}/d"],
     "scale pack belongs to base", pack_of_other_base),
    ("export-base-hash-edited", ["export", "--base", "{x}", "--pack", "{pack}", "--out", "{tmp}/d"],
     "base_hash does not match the tensors", base_hash_edited),
    # generate
    ("generate-graph-absolute", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "unet.graphs[0].onnx must be a relative path", graph_path("/etc/passwd")),
    ("generate-graph-climbs-out", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "unet.graphs[0].onnx must be a relative path", graph_path("../deploy/unet_0.onnx")),
    ("generate-files-table-escape", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "names '../../etc/passwd', which is not a path inside the deploy dir", files_entry_outside),
    ("generate-weights-climb-out", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "weights_file must be a relative path", weights_path("../../unet.weights")),
    ("generate-weights-absolute", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "weights_file must be a relative path", weights_path("/etc/passwd")),
    ("generate-scheduler-outside", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "scheduler must be a relative path", scheduler_outside),
    ("generate-link-outside", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "leads outside", weights_link_outside),
    ("generate-weights-unlisted", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "unet.weights is used but not in the files table", weights_not_listed),
    ("generate-tokenizer-file-unlisted", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "is in the folder tokenizer but not in the files table", tokenizer_file_not_listed),
    ("generate-height-wrong-type", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "height must be an integer, got '16'", height_as_string),
    ("generate-not-a-scheduler", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "which is not a diffusers scheduler", scheduler_not_a_scheduler),
    ("generate-file-altered", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "does not match its hash", deploy_file_altered),
    ("generate-unfinished", ["generate", "{x}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "is an unfinished deploy dir", deploy_unfinished),
    ("generate-steps-huge", [*GENERATE, "--out", "{tmp}/a.png", "--steps", "100000"], "steps must be in 1..1000", None),
    ("generate-prompt-not-utf8", ["generate", "{deploy}", "--prompt", NOT_UTF8, "--out", "{tmp}/a.png"],
     "--prompt is not valid UTF-8", None),
    ("generate-out-inside-deploy", [*GENERATE, "--out", "{deploy}/a.png"], "lies inside the input", None),
    ("generate-out-dir-is-deploy", [*GENERATE, "--out-dir", "{deploy}"], "lies inside the input", None),
    ("generate-out-jpeg", [*GENERATE, "--out", "{tmp}/a.jpg"], "name the output *.png", None),
    ("generate-size", [*GENERATE, "--out", "{tmp}/a.png", "--height", "64"], "re-export with --height 64", None),
    ("generate-size-huge", [*GENERATE, "--out", "{tmp}/a.png", "--height", "100000"],
     "this model takes multiples of 4 up to 64", None),
    ("generate-deploy-is-pack", ["generate", "{pack}", "--prompt", "a sks dog", "--out", "{tmp}/a.png"],
     "is not a qpdeploy deploy dir", None),
    ("generate-backend", [*GENERATE, "--out", "{tmp}/a.png", "--backend", "cuda"], "'cuda' is not one of 'ort', 'trt', 'torch'", None),
    ("generate-scheduler", [*GENERATE, "--out", "{tmp}/a.png", "--scheduler", "heun"], "'heun' is not one of", None),
    # demo
    ("demo-force-onto-base", ["demo", "--out", "{base}", "--force"], "is not a qpdeploy.demo artifact", None),
    ("demo-subject", ["demo", "--out", "{tmp}/demo", "--subject", "xyz"], "'xyz' is not one of 'sks', 'zwx', 'qlv'", None),
    ("demo-steps", ["demo", "--out", "{tmp}/demo", "--steps", "0"], "steps must be >= 1", None),
    ("unknown-option", ["export", "--base", "{base}", "--out", "{tmp}/d", "--bogus"], "No such option: --bogus", None),
    ("not-a-number", [*TRAIN, "--out", "{tmp}/p", "--steps", "many"], "Invalid value for '--steps': Input should be a valid integer", None),
]


@pytest.mark.parametrize("args, expected, prepare", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_touches_nothing(art, tmp_path, args, expected, prepare):
    x = prepare(art, tmp_path) if prepare is not None else None
    inputs = [art[k] for k in ("base", "pack", "deploy", "images")] + ([x] if x is not None else [])
    before = [tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs]
    names = {**{k: str(v) for k, v in art.items()}, "tmp": str(tmp_path), "x": str(x)}
    result = runner.invoke(app, [a.format(**names) if "{" in a else a for a in args])

    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert [tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs] == before
    assert not list(tmp_path.glob("p-base")) and not (tmp_path / "p").exists()  # nothing half-made


def test_there_are_at_least_forty_cases_over_all_five_commands():
    assert len(CASES) >= 40
    assert {c[1][0] for c in CASES} == {"quantize", "train", "export", "generate", "demo"}
