"""``shiq-train export RUN [--step N] --hf OUT``: a Hugging Face folder transformers loads and generates from.

The independent reference is our megatron model itself (random weights, never converted from a transformers
model): the folder's ``AutoModelForCausalLM`` must give its logits on the same token ids, greedy generation
must follow its argmax, and ``AutoTokenizer`` must load the run's tokenizer from the folder.
"""

import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

import commands
import pytest
import torch
import transformers
import yaml
from checkpoint_files import write_meta
from test_eval_cli import VOCAB, tiny_hf_folder  # (a tiny Llama folder with a word-level tokenizer)

from shiq_data.assets import config_dir
from shiq_data.buffer import FORMAT
from shiq_data.tokenizers import load_tokenizer
from shiq_train import export, parallel
from shiq_train import model as M
from shiq_train.checkpoint import save_checkpoint
from shiq_train.cli import llama_config_from_model

REPO = Path(__file__).resolve().parents[1]


def test_exported_folder_loads_in_transformers_with_our_logits(tmp_path, capsys):
    warnings.filterwarnings("ignore")
    tok_info = load_tokenizer(str(tiny_hf_folder(tmp_path / "tok")))[1]
    section = yaml.safe_load((config_dir() / "model" / "tiny.yaml").read_text())
    cfg = M.ModelConfig.from_dict({**section, "num_query_groups": 2, "share_embeddings_and_output_weights": False})
    assert cfg.vocab_size == VOCAB
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    meta = {
        "config": {"init": "none"},
        "hf_config": llama_config_from_model(cfg).to_dict(),
        "tokenizer": tok_info,
        "loss": {"name": "dpo", "beta": 0.25, "gamma": 1.0},
    }
    run = tmp_path / "run"
    with parallel.distributed(seed=0):
        mg = M.build_model(cfg).eval()
        with torch.no_grad():  # non-trivial norms, so a swapped or dropped norm weight would show
            for name, p in mg.named_parameters():
                if "norm" in name or "layernorm" in name:
                    p.uniform_(0.5, 1.5)
        for step in (1, 2):
            save_checkpoint(run / "checkpoints", step, mg, meta=meta)
        with torch.no_grad():
            want = mg(**M.model_inputs(ids)).float()
    # the tokenizer folder the run recorded is not followed (a file names no path to read): it is given
    assert export.main([str(run), "--step", "2", "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"step_00000002/meta.json: the tokenizer is the folder {tmp_path / 'tok'} as recorded there" in err
    assert f"give it with --tokenizer {tmp_path / 'tok'}\n" in err and not (tmp_path / "hf").exists()
    tok_arg = ["--tokenizer", str(tmp_path / "tok")]
    assert export.main([str(run), *tok_arg, "--step", "2", "--hf", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = hf(ids).logits
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    greedy = hf.generate(ids[:1, :6], max_new_tokens=1, do_sample=False)
    assert int(greedy[0, -1]) == int(want[0, 5].argmax())  # from position 5's logits
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("w3 w9 w17", add_special_tokens=False)["input_ids"] == [3, 9, 17]
    record = json.loads((tmp_path / "hf" / "shiq_export.json").read_text())
    assert (record["run"], record["step"], record["loss"]["beta"]) == ("run", 2, 0.25)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())  # for readers of the older layout too
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == hf.config.rope_parameters["rope_theta"]
    assert record["tokenizer"]["fingerprint"] == tok_info["fingerprint"]
    # the tokenizer has no BOS and no model shipped the config (LlamaConfig's default 1, here "<eos>"): none
    assert tok.bos_token_id is None and config["bos_token_id"] is None and hf.generation_config.bos_token_id is None
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation.get("bos_token_id") is None and generation["eos_token_id"] == tok.eos_token_id == 1

    capsys.readouterr()  # refusals: one line, exit status 2, nothing written
    assert export.main([str(run), *tok_arg, "--step", "2", "--hf", str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert export.main([str(run), *tok_arg, "--step", "7", "--hf", str(tmp_path / "x")]) == 2
    assert "no checkpoint of step 7" in capsys.readouterr().err and not (tmp_path / "x").exists()
    other = tiny_hf_folder(tmp_path / "other")
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"w5"', '"w5x"'))
    assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "x"), "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
    assert err.startswith("shiq-train export: error: --tokenizer ") and "fingerprint" in err
    assert not (tmp_path / "x").exists()
    # --overwrite replaces an earlier export only: never the run, a folder holding it or one inside it
    buffer = tmp_path / "buffer"
    buffer.mkdir()
    (buffer / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    (tmp_path / "link").symlink_to(tmp_path / "hf")  # rmtree refused it only after the whole export
    for out, needle in [
        (tmp_path / "link", "is a symbolic link (to "),
        (run, "is the run folder"),
        (tmp_path, "holds the run folder"),
        (run / "checkpoints" / "step_00000002", "is inside the run's checkpoints"),
        (other, "is not an earlier export"),
        (run / "checkpoints" / "step_00000002" / "hf", "is inside the run's checkpoints"),
        (buffer / "hf", "is inside the buffer"),
    ]:
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        assert export.main([str(run), *tok_arg, "--hf", str(out), "--overwrite"]) == 2
        assert needle in capsys.readouterr().err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "hf"), "--overwrite"]) == 0  # the newest step
    # an export kept inside the run folder is replaced like any other earlier export
    assert export.main([str(run), *tok_arg, "--hf", str(run / "hf")]) == 0
    assert export.main([str(run), *tok_arg, "--step", "1", "--hf", str(run / "hf"), "--overwrite"]) == 0
    assert json.loads((run / "hf" / "shiq_export.json").read_text())["step"] == 1
    assert (run / "hf").stat().st_mode & 0o777 == 0o755  # shared like every result, not the temporary folder's 0700

    # A hand-edited meta.json or export record: one line naming the file and field, nothing written
    from shiq_eval.checkpoints import EvalInputError, checkpoint_info, hf_folder_info

    step = run / "checkpoints" / "step_00000002"
    saved = json.loads((step / "meta.json").read_text())
    # an edit that leaves meta.json.sha256 as it was is refused by the checksum, by export and shiq-eval alike
    sums = step / "meta.json.sha256"
    assert sums.read_text() == f"{hashlib.sha256((step / 'meta.json').read_bytes()).hexdigest()}  meta.json\n"
    edited = {**saved, "meta": {**saved["meta"], "loss": {**saved["meta"]["loss"], "beta": 0.5}}}
    (step / "meta.json").write_text(json.dumps(edited))
    assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert f"{step / 'meta.json'}: sha256 differs from meta.json.sha256's" in err and not (tmp_path / "y").exists()
    with pytest.raises(EvalInputError, match="meta.json: sha256 differs from meta.json.sha256's"):
        checkpoint_info(step)
    # a checkpoint saved before that checksum was written has none: its meta.json is read as it is
    sums.unlink()
    assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "older")]) == 0
    assert json.loads((tmp_path / "older" / "shiq_export.json").read_text())["loss"]["beta"] == 0.5
    for link in (sums, step / "meta.json"):  # a link for either file could name any file outside the folder
        target = tmp_path / "elsewhere"
        target.write_text(json.dumps(saved))
        write_meta(step / "meta.json", json.dumps(saved))
        link.unlink()
        link.symlink_to(target)
        assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "y")]) == 2
        assert f"{link} is a link; a checkpoint's files must be plain files" in capsys.readouterr().err
        assert not (tmp_path / "y").exists()
        link.unlink()
    for edit, needle in [
        ({"num_hidden_layers": cfg.num_layers + 1}, "its weights do not fit meta.hf_config"),
        ({"hidden_size": "x"}, "meta.json: field meta.hf_config:"),
        ({"num_hidden_layers": cfg.num_layers - 1}, f"beyond the {cfg.num_layers - 1} of meta.hf_config"),
        # a model of 10^12 wide layers was allocated before its weights were compared with it: a memory error
        ({"hidden_size": 10**12}, "its weights do not fit meta.hf_config"),
    ]:
        bad = {**saved, "meta": {**saved["meta"], "hf_config": {**saved["meta"]["hf_config"], **edit}}}
        write_meta(step / "meta.json", json.dumps(bad))
        assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "y")]) == 2
        assert needle in capsys.readouterr().err and not (tmp_path / "y").exists()
    for bad, needle in [
        ({k: v for k, v in saved.items() if k != "meta"}, "field meta.hf_config is missing"),
        # copied into the export's record as NaN (not JSON), which shiq-eval then refused; NaN itself is not
        # JSON, refused as it is read
        (
            {**saved, "meta": {**saved["meta"], "loss": {"name": "shiq", "beta": float("nan")}}},
            "meta.json: not valid JSON (NaN is not a JSON number: line 1 column ",
        ),
        ({**saved, "step": 1}, "field 'step' is 1 in the folder of step 2"),
    ]:
        write_meta(step / "meta.json", json.dumps(bad))
        assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "y")]) == 2
        assert needle in capsys.readouterr().err and not (tmp_path / "y").exists()
    # a number beyond float range is JSON, read as infinity: the field's check refuses it
    beyond = {**saved, "meta": {**saved["meta"], "loss": {"name": "shiq", "beta": "BEYOND"}}}
    write_meta(step / "meta.json", json.dumps(beyond).replace('"BEYOND"', "1e999"))
    assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "y")]) == 2
    assert "meta.loss.beta must be" in capsys.readouterr().err and not (tmp_path / "y").exists()
    write_meta(step / "meta.json", json.dumps({**saved, "meta": {**saved["meta"], "tokenizer": {"name": 5}}}))
    assert export.main([str(run), "--hf", str(tmp_path / "y")]) == 2  # (shlex.quote(5) was a traceback)
    assert "field meta.tokenizer.name must be a string, got 5" in capsys.readouterr().err
    for bad, needle in [  # what shiq-eval reads of the same meta.json
        ({**saved, "step": 1}, "field 'step' is 1 in the folder of step 2"),
        (
            {**saved, "meta": {**saved["meta"], "config": {"init": 3}}},
            "meta.config.init must be a string or null, got 3",
        ),
    ]:
        write_meta(step / "meta.json", json.dumps(bad))
        with pytest.raises(EvalInputError, match=re.escape(needle)):
            checkpoint_info(step)
    # a run that started from an earlier export: that folder is its reference, never replaced by its own export
    write_meta(
        step / "meta.json", json.dumps({**saved, "meta": {**saved["meta"], "config": {"init": str(run / "hf")}}})
    )
    before = (run / "hf" / "model.safetensors").read_bytes()
    assert export.main([str(run), *tok_arg, "--hf", str(run / "hf"), "--overwrite"]) == 2
    assert "is the model the run started from" in capsys.readouterr().err
    assert (run / "hf" / "model.safetensors").read_bytes() == before
    write_meta(step / "meta.json", json.dumps(saved))
    record_path = tmp_path / "hf" / "shiq_export.json"
    record = json.loads(record_path.read_text())
    assert hf_folder_info(tmp_path / "hf")["beta"] == 0.25
    for field, value in [("step", None), ("step", "abc"), ("tokenizer", 5), ("loss", {"name": "dpo", "beta": "x"})]:
        record_path.write_text(json.dumps({**record, field: value}))
        with pytest.raises(EvalInputError, match=f"shiq_export.json: field '{field}"):
            hf_folder_info(tmp_path / "hf")
    for value in [None, {}, {"../x.safetensors": "0" * 64}, {"model.safetensors": "abc"}, "x"]:
        record_path.write_text(json.dumps({**record, "sha256": value}))
        with pytest.raises(EvalInputError, match="shiq_export.json: field 'sha256'"):
            hf_folder_info(tmp_path / "hf")
    upper = {k: d.upper() for k, d in record["sha256"].items()}  # hex digits in either case
    record_path.write_text(json.dumps({**record, "sha256": upper}))
    assert hf_folder_info(tmp_path / "hf")["sha256"] == record["sha256"]
    record_path.write_text(json.dumps(record))

    # the record holds each weight file's SHA-256; shiq-eval checks it before loading the weights
    from shiq_eval.checkpoints import hf_policy

    weights = tmp_path / "hf" / "model.safetensors"
    data = weights.read_bytes()
    assert record["sha256"] == {"model.safetensors": hashlib.sha256(data).hexdigest()}
    assert hf_policy(hf_folder_info(tmp_path / "hf")).config.num_hidden_layers == cfg.num_layers
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the last weight's last byte: still a valid file
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # which transformers loads without a word
    with pytest.raises(ValueError, match=f"{weights}: sha256 differs from shiq_export.json's"):
        hf_policy(hf_folder_info(tmp_path / "hf"))
    from shiq_train.hf_convert import load_causal_lm  # every loader of a folder: --reference, init=, ref-stats

    with pytest.raises(ValueError, match=f"{weights}: sha256 differs from shiq_export.json's"):
        load_causal_lm(str(tmp_path / "hf"))
    # a record without its checksums turned the check off (a warning, and the edited weights were read)
    record_path.write_text(json.dumps({k: v for k, v in record.items() if k != "sha256"}))
    with pytest.raises(ValueError, match="shiq_export.json: field 'sha256' is missing, so the weights cannot be"):
        load_causal_lm(str(tmp_path / "hf"))


def _untied_run(tmp_path):
    """A run of the tiny model with an output layer of its own (one checkpoint, step 1), and its tokenizer
    option."""
    tok_info = load_tokenizer(str(tiny_hf_folder(tmp_path / "tok")))[1]
    section = yaml.safe_load((config_dir() / "model" / "tiny.yaml").read_text())
    cfg = M.ModelConfig.from_dict({**section, "num_query_groups": 2, "share_embeddings_and_output_weights": False})
    meta = {
        "config": {"init": "none"},
        "hf_config": llama_config_from_model(cfg).to_dict(),
        "tokenizer": tok_info,
        "loss": {"name": "dpo", "beta": 0.25},
    }
    with parallel.distributed(seed=0):
        save_checkpoint(tmp_path / "run" / "checkpoints", 1, M.build_model(cfg), meta=meta)
    return tmp_path / "run", ["--tokenizer", str(tmp_path / "tok")]


def test_a_meta_json_that_ties_the_embeddings_of_an_untied_run_is_refused(tmp_path, capsys):
    """meta.hf_config edited to tie_word_embeddings true on a run with an output layer of its own: the output
    layer was skipped as the tied copy and the export (exit 0) gave the embedding's logits instead of the run's."""
    warnings.filterwarnings("ignore")
    run, tok_arg = _untied_run(tmp_path)
    step = run / "checkpoints" / "step_00000001"
    saved = json.loads((step / "meta.json").read_text())
    saved["meta"]["hf_config"]["tie_word_embeddings"] = True
    write_meta(step / "meta.json", json.dumps(saved))
    assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("shiq-train export: error: ") and "holds an output layer of its own beside the embedding" in err
    )
    assert "tie_word_embeddings" in err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"head_dim": 0}, "head_dim=0: expected an integer >= 1"),  # (ZeroDivisionError in transformers' attention)
        ({"vocab_size": 0}, "model.vocab_size = 0 is not valid"),  # (IndexError in transformers' embedding)
    ],
)
def test_a_meta_json_with_heads_or_a_vocabulary_of_no_width_is_refused_in_one_line(tmp_path, capsys, edit, needle):
    """meta.hf_config edited to what no model has (checked as an import checks a config): these ended in a
    traceback from transformers instead of one line naming the file and field."""
    warnings.filterwarnings("ignore")
    run, tok_arg = _untied_run(tmp_path)
    step = run / "checkpoints" / "step_00000001"
    saved = json.loads((step / "meta.json").read_text())
    saved["meta"]["hf_config"].update(edit)
    write_meta(step / "meta.json", json.dumps(saved))
    assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"shiq-train export: error: {step / 'meta.json'}: field meta.hf_config: ") and needle in err
    assert not (tmp_path / "hf").exists()


def test_a_meta_json_that_ties_the_embeddings_of_an_untied_pipeline_run_is_refused(tmp_path, capsys):
    """The same edit on a run saved over two pipeline stages: the last stage's output layer, in a file without the
    embedding, was skipped as the tied copy, and the export (exit 0) gave the embedding's logits instead of the
    run's. The rank file records it as the output layer of its own (a tied run's copy is recorded as the
    embedding)."""
    from shiq_train.checkpoint import read_rank_file, save_hashed

    warnings.filterwarnings("ignore")
    run, tok_arg = _untied_run(tmp_path)
    step = run / "checkpoints" / "step_00000001"
    state = read_rank_file(step / "rank_tp0_pp0_dp0.pt")
    (step / "rank_tp0_pp0_dp0.pt").unlink()
    stages = [{}, {}]  # rank file states ({"model", "params"}) of two stages of one layer each
    for name, value in state["model"].items():
        pp = 0 if name.startswith(("embedding.", "decoder.layers.0.")) else 1
        local = name.replace("decoder.layers.1.", "decoder.layers.0.")
        stages[pp].setdefault("model", {})[local] = value
        stages[pp].setdefault("params", {})[local] = state["params"][name]  # (its full name)
    for pp, stage in enumerate(stages):
        save_hashed({**state, **stage}, step / f"rank_tp0_pp{pp}_dp0.pt")
    saved = json.loads((step / "meta.json").read_text())
    saved["layout"]["pp"] = 2
    write_meta(step / "meta.json", json.dumps(saved))
    assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "untied")]) == 0  # (the split checkpoint reads)
    saved["meta"]["hf_config"]["tie_word_embeddings"] = True
    write_meta(step / "meta.json", json.dumps(saved))
    assert export.main([str(run), *tok_arg, "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"shiq-train export: error: {step / 'rank_tp0_pp1_dp0.pt'}: holds an output layer of its own")
    assert "tie_word_embeddings" in err and not (tmp_path / "hf").exists()


def test_an_empty_path_option_is_refused_naming_the_option(tmp_path, capsys, monkeypatch):
    """``Path("")`` is the current folder: ``--hf ""`` was refused as ``--hf . exists``, an empty RUN exported the
    run the shell stood in, and an empty ``--tokenizer`` fell back to the recorded one. Each is refused in one line
    naming the option, exit status 2, nothing written."""
    run, tok_arg = _untied_run(tmp_path)
    monkeypatch.chdir(run)  # where an empty path points
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()  # (the checkpoint's progress bars)
    for argv, needle in [
        ([str(run), *tok_arg, "--hf", ""], "argument --hf: must name a folder, got an empty string"),
        (["", *tok_arg, "--hf", str(tmp_path / "x")], "argument RUN: must name a run folder, got an empty string"),
        ([str(run), "--tokenizer", " ", "--hf", str(tmp_path / "x")], "argument --tokenizer: must name a tokenizer"),
    ]:
        with pytest.raises(SystemExit) as stop:
            export.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert sorted(tmp_path.rglob("*")) == before


def test_an_out_folder_that_cannot_be_made_is_refused_naming_the_option(tmp_path, capsys, monkeypatch):
    """An --hf the system will not make (no permission, a read-only file system) ended in the OS error naming the
    temporary folder beside it ("[Errno 13] Permission denied: '.../.hf.HOST-PID-hex.tmp.held'"), not the option
    or the folder given."""
    import shiq_data.io

    run, tok_arg = _untied_run(tmp_path)
    capsys.readouterr()  # (the checkpoint's progress bars)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shiq_data.io, "held_dir", refuse)
    out = tmp_path / "locked" / "hf"
    assert export.main([str(run), *tok_arg, "--hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"shiq-train export: error: --hf {out}: cannot make the folder (Permission denied)\n", err
    assert not (tmp_path / "locked").exists()


def test_a_tokenizer_option_that_cannot_be_loaded_is_refused_naming_the_option(tmp_path, capsys):
    """--tokenizer naming a folder without tokenizer files was refused as "the run's tokenizer ... cannot be
    loaded: give it with --tokenizer FOLDER", advice the command line had followed."""
    run, _ = _untied_run(tmp_path)
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # (the checkpoint's progress bars)
    assert export.main([str(run), "--tokenizer", str(tmp_path / "empty"), "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shiq-train export: error: --tokenizer {tmp_path / 'empty'}: cannot be loaded (")
    assert len(err.splitlines()) == 1 and "give it with --tokenizer" not in err, err
    assert not (tmp_path / "hf").exists()


def test_the_run_s_checkpoints_folder_exports_as_the_run_does(tmp_path, capsys):
    """RUN/checkpoints (what shiq-eval run and ref-stats --megatron-checkpoint take for the run) was refused as
    "no checkpoint (RUN/checkpoints/checkpoints/latest does not exist)"; it exports the newest step, or --step's,
    recorded under the run's name."""
    run, tok_arg = _untied_run(tmp_path)
    capsys.readouterr()  # (the checkpoint's progress bars)
    for argv, out in [([], tmp_path / "newest"), (["--step", "1"], tmp_path / "one")]:
        assert export.main([str(run / "checkpoints"), *argv, *tok_arg, "--hf", str(out)]) == 0, capsys.readouterr()
        record = json.loads((out / "shiq_export.json").read_text())
        assert (record["run"], record["step"]) == ("run", 1)
    assert export.main([str(run / "checkpoints"), "--step", "2", *tok_arg, "--hf", str(tmp_path / "two")]) == 2
    assert "no checkpoint of step 2" in capsys.readouterr().err and not (tmp_path / "two").exists()


STOP_AFTER_WEIGHTS = """
import os, signal, sys
from shiq_train import export
save = export.save_llama
def save_then_stop(model, folder):  # a SIGTERM once the weights are in the temporary folder
    save(model, folder)
    os.kill(os.getpid(), signal.SIGTERM)
export.save_llama = save_then_stop
sys.exit(export.main(sys.argv[1:]))
"""


def test_a_sigterm_while_exporting_leaves_no_folder_and_says_so(tmp_path):
    """SIGTERM (a scheduler's stop) ended an export at once, leaving its temporary folder ``.OUT.HOST-PID.tmp``
    (the weights written so far) and its ``.held`` lock beside OUT, until an export into the same OUT; it is now
    cleaned up as Ctrl-C's is, and the command ends with one line and status 143."""
    run, tok_arg = _untied_run(tmp_path)
    script = tmp_path / "stop.py"
    script.write_text(STOP_AFTER_WEIGHTS)
    (tmp_path / "outs").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(script), str(run), *tok_arg, "--hf", str(tmp_path / "outs" / "hf")]
    done = commands.run(cmd, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 143, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1] == "shiq-train export: terminated", done.stderr[-2000:]
    assert list((tmp_path / "outs").iterdir()) == []


def test_a_q_sharp_value_model_folder_is_named_as_such(tmp_path, capsys):
    """A folder of ``shiq-train loss=qsharp_value`` (a value model, no checkpoints) was refused as "no checkpoint
    (.../checkpoints/latest does not exist); expected a shiq-train run", though shiq-train wrote it."""
    value = tmp_path / "qsharp"
    value.mkdir()
    (value / "value_model.json").write_text("{}")  # (what names the folder; its contents are not read)
    for step in ([], ["--step", "3"]):
        assert export.main([str(value), *step, "--hf", str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"shiq-train export: error: {value}: a Q♯ value model, not a policy run"), err
        assert "--guide" in err and len(err.splitlines()) == 1 and not (tmp_path / "hf").exists()
