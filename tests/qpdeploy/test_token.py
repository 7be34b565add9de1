"""Pivotal tuning (--train-token): the identifier's embedding row trains with the scales, travels
in the pack, resumes bit-identically and is baked into the exported text encoder."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qpdeploy.config import TrainConfig
from qpdeploy.data import encode_prompts
from qpdeploy.errors import QPDeployError
from qpdeploy.pack import load_pack, pack_hash
from qpdeploy.token import (PREFIX, apply_tokens, check_token_record, identifier_token_ids, text_encoders,
                            tokens_applied)
from qpdeploy.train import train

PROMPT = "a photo of sks dog"
pytestmark = pytest.mark.filterwarnings("ignore:.*instance image.*:UserWarning")


def run(cheap_base, pipe, images, out, family="sd1", **kwargs):
    config_keys = {k: kwargs.pop(k) for k in list(kwargs) if k in TrainConfig.__dataclass_fields__}
    config = TrainConfig(PROMPT, **{"train_token": True, "token_lr": 0.05, "steps": 3, **config_keys})
    return train(cheap_base(family), images, out, config, pipe=pipe, device="cpu", **kwargs)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_identifier_is_one_token_per_tokenizer_or_refused(tiny_pipe, family):
    pipe = tiny_pipe(family)
    ids = identifier_token_ids(pipe, "sks")
    assert set(ids) == set(text_encoders(pipe)) == ({"text_encoder", "text_encoder_2"} if family == "sdxl"
                                                      else {"text_encoder"})
    assert ids["text_encoder"] == pipe.tokenizer("sks", add_special_tokens=False).input_ids[0]
    with pytest.raises(QPDeployError, match=r"one token: 'sks dog' is 2 tokens \(sks, dog\)"):
        identifier_token_ids(pipe, "sks dog")
    with pytest.raises(QPDeployError, match="'qwzrt' is not in text_encoder's vocabulary"):
        identifier_token_ids(pipe, "qwzrt")


@pytest.mark.parametrize("family", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_the_row_trains_travels_in_the_pack_and_reproduces_the_trained_conditioning(cheap_base, tiny_pipe,
                                                                                    instance_dir, tmp_path, family):
    pipe = tiny_pipe(family)
    tables = {name: enc.get_input_embeddings().weight.detach().clone() for name, (_, enc) in text_encoders(pipe).items()}
    before = encode_prompts(pipe, [PROMPT], "cpu")
    path, report = run(cheap_base, pipe, instance_dir, tmp_path / "pack", family)
    # the encoders themselves were never written, and their hooks are gone
    for name, (_, enc) in text_encoders(pipe).items():
        assert torch.equal(enc.get_input_embeddings().weight, tables[name])
        assert all(p.requires_grad for p in enc.parameters())  # as the caller's pipeline had them
    assert torch.equal(encode_prompts(pipe, [PROMPT], "cpu")[0], before[0])
    pack = load_pack(path)
    ids = identifier_token_ids(pipe, "sks")
    assert pack.token == {"identifier": "sks", "ids": ids}
    assert set(pack.tokens) == {PREFIX + name for name in ids}
    width = {name: tables[name].shape[1] for name in ids}
    assert report["token_params"] == sum(width.values())
    assert report["trainable_params"] == sum(v.numel() for v in pack.scales.values()) + report["token_params"]
    moved = {name: float((pack.tokens[PREFIX + name] - tables[name][ids[name]]).abs().max()) for name in ids}
    assert all(m > 1e-3 for m in moved.values()), moved  # lr 0.05 x 3 steps moves each row
    # the file holds the rows, and they are part of the pack's identity
    stored = load_file(str(path / "scales.safetensors"))
    assert all(torch.equal(stored[k], v) for k, v in pack.tokens.items())
    without = type(pack)(pack.strategy, pack.intervals, pack.base_hash, pack.scales, pack.s1_intervals)
    assert pack_hash(pack) != pack_hash(without)
    # applying the rows gives the conditioning of the trained row: only the identifier's
    # position changes, other prompts are untouched
    with tokens_applied(pipe, pack.token, pack.tokens):
        tuned = encode_prompts(pipe, [PROMPT, "a photo of dog"], "cpu")
        assert not torch.allclose(tuned[0][0], before[0][0])
        assert torch.equal(tuned[0][1], encode_prompts(tiny_pipe(family), ["a photo of dog"], "cpu")[0][0])
        row = pipe.text_encoder.get_input_embeddings().weight[ids["text_encoder"]]
        assert torch.equal(row, pack.tokens[PREFIX + "text_encoder"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, tables["text_encoder"])  # restored


@pytest.mark.slow
def test_a_run_with_the_token_resumes_bit_identical(cheap_base, tiny_pipe, instance_dir, tmp_path):
    settings = dict(strategy="s2", intervals=2, batch_size=1, checkpoint_every=2)
    whole, _ = run(cheap_base, tiny_pipe("sd1"), instance_dir, tmp_path / "whole", steps=4, **settings)
    run(cheap_base, tiny_pipe("sd1"), instance_dir, tmp_path / "first", steps=2, **settings)
    state = load_file(str(tmp_path / "first.run" / "checkpoints" / "step-000002" / "state.safetensors"))
    assert {"token.row.text_encoder", "token.adam.text_encoder.exp_avg"} <= set(state)
    resumed, report = run(cheap_base, tiny_pipe("sd1"), instance_dir, tmp_path / "resumed", steps=4,
                          resume=tmp_path / "first.run", **settings)
    assert report["resumed_from_step"] == 2
    a, b = load_file(str(whole / "scales.safetensors")), load_file(str(resumed / "scales.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint of a run without the token does not resume one with it
    run(cheap_base, tiny_pipe("sd1"), instance_dir, tmp_path / "plain", steps=2, train_token=False, **settings)
    with pytest.raises(QPDeployError, match="train_token=False"):
        run(cheap_base, tiny_pipe("sd1"), instance_dir, tmp_path / "mixed", steps=4, resume=tmp_path / "plain.run",
            **settings)


def test_rows_that_do_not_fit_the_model_are_refused(cheap_base, tiny_pipe, instance_dir, tmp_path):
    pipe = tiny_pipe("sd1")
    path, _ = run(cheap_base, pipe, instance_dir, tmp_path / "pack", steps=1)
    pack = load_pack(path)
    other_id = {"identifier": "sks", "ids": {"text_encoder": pack.token["ids"]["text_encoder"] + 1}}
    with pytest.raises(QPDeployError, match="as token 69 of text_encoder, this model's tokenizer maps it to 68"):
        check_token_record(pipe, other_id, pack.tokens)
    with pytest.raises(QPDeployError, match="tunes the identifier in text_encoder, the model has text_encoder, "
                                            "text_encoder_2"):
        apply_tokens(tiny_pipe("sdxl"), pack.token, pack.tokens)
    wide = {PREFIX + "text_encoder": torch.zeros(7)}
    with pytest.raises(QPDeployError, match=r"has shape \(7,\), the encoder's embeddings are 32 wide"):
        check_token_record(pipe, pack.token, wide)


def test_a_pack_file_with_rows_but_no_record_is_refused(cheap_base, tiny_pipe, instance_dir, tmp_path):
    import json

    path, _ = run(cheap_base, tiny_pipe("sd1"), instance_dir, tmp_path / "pack", steps=1)
    meta = json.loads((path / "pack.json").read_text())
    del meta["token"]
    (path / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(QPDeployError, match=r"identifier rows and the token record must come together \(1 row"):
        load_pack(path)


@pytest.mark.slow
def test_export_bakes_the_row_into_the_text_encoder_graph(cheap_base, tiny_pipe, instance_dir, tmp_path):
    from qpdeploy.calibrate import sqnr_db
    from qpdeploy.exporters.config import ExportConfig
    from qpdeploy.exporters.export import export_deploy
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.exporters.verify import ort_session

    pipe = tiny_pipe("sd1")
    path, _ = run(cheap_base, pipe, instance_dir, tmp_path / "pack")
    pack = load_pack(path)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    deploy, _ = export_deploy(cheap_base("sd1"), pipe, tmp_path / "deploy", ExportConfig(verify=False), pack)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)  # the caller's pipeline is unchanged
    (encoder,) = read_manifest(deploy).data["text_encoders"]
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="np").input_ids
    hidden = torch.from_numpy(ort_session(deploy / encoder["onnx"]).run(None, {"input_ids": ids.astype(np.int32)})[0])
    with torch.no_grad():
        untuned = pipe.text_encoder(torch.from_numpy(ids))[0]
        with tokens_applied(pipe, pack.token, pack.tokens):
            tuned = pipe.text_encoder(torch.from_numpy(ids))[0]
    assert sqnr_db(tuned, hidden) > 80  # the graph computes the tuned encoder
    assert sqnr_db(untuned, hidden) < 60  # and not the original one
