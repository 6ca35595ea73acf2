"""Checkpoints: exact round trips, the `latest` pointer, survival of a kill mid-write, pruning, LoRA adapters."""

import json
import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from thor_min.checkpoint import load_latest, save_checkpoint
from thor_min.lora import apply_lora, lora_parameters, lora_state_dict
from thor_min.optim import build_optimizer



def tiny_qwen(seed: int = 0, hidden: int = 32, layers: int = 2) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def train_one_step(model, optimizer) -> None:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def trained():
    model = tiny_qwen()
    optimizer = build_optimizer(model.parameters(), lr=1e-2)
    train_one_step(model, optimizer)
    return model, optimizer


def test_round_trip_restores_the_weights(tmp_path, trained):
    model, optimizer = trained
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, state={})
    fresh = tiny_qwen(seed=7)
    load_latest(tmp_path, model=fresh, optimizer=build_optimizer(fresh.parameters(), lr=1e-2))
    assert states_equal(fresh.state_dict(), saved), "loaded weights differ from the saved ones"


def test_round_trip_restores_the_optimizer_state(tmp_path, trained):
    model, optimizer = trained
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, state={})
    fresh = tiny_qwen(seed=7)
    fresh_optimizer = build_optimizer(fresh.parameters(), lr=5.0)
    load_latest(tmp_path, model=fresh, optimizer=fresh_optimizer)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    as_tuples = lambda groups: [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    assert as_tuples(loaded["param_groups"]) == as_tuples(saved["param_groups"]), \
        "optimizer hyper-parameters not restored (the state travels keyed by name, betas as a list)"
    assert saved["state"].keys() == loaded["state"].keys() and all(
        states_equal(saved["state"][i], loaded["state"][i]) for i in saved["state"]), "Adam moments not restored"


def test_round_trip_restores_rng_states(tmp_path, trained):
    model, optimizer = trained
    torch.manual_seed(123)
    random.seed(456)
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, state={})
    expected = (torch.rand(4), random.random())
    torch.manual_seed(0)
    random.seed(0)
    load_latest(tmp_path, model=model, optimizer=optimizer)
    got = (torch.rand(4), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1], "RNG streams not restored"


def test_round_trip_returns_step_and_state(tmp_path, trained):
    model, optimizer = trained
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=17, state={"skipped": 2, "epoch": [1, 3]})
    found = load_latest(tmp_path, model=model, optimizer=optimizer)
    assert (found.step, found.state) == (17, {"skipped": 2, "epoch": [1, 3]}), f"wrong checkpoint record {found}"


def test_load_from_an_empty_directory_returns_none(tmp_path, trained):
    model, optimizer = trained
    assert load_latest(tmp_path / "nothing", model=model, optimizer=optimizer) is None, "no checkpoint -> None"


def test_latest_points_at_the_newest_checkpoint(tmp_path, trained):
    model, optimizer = trained
    for step in (3, 5):
        final = save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=step, state={}, keep=2)
    assert (tmp_path / "latest").read_text().strip() == final.name == "ckpt-0000005", "latest pointer wrong"
    assert load_latest(tmp_path, model=model, optimizer=optimizer).step == 5, "load_latest did not follow latest"


def test_stale_tmp_directory_is_ignored(tmp_path, trained):
    model, optimizer = trained
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=2, state={"at": 2})
    stale = tmp_path / "ckpt-0000004.tmp"   # a kill mid-write of step 4: partial files, no rename, no pointer
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"\x80 truncated")
    (stale / "state.json").write_text(json.dumps({"step": 4, "state": {"at": 4}}))
    train_one_step(model, optimizer)
    found = load_latest(tmp_path, model=model, optimizer=optimizer)
    assert found.step == 2 and found.state == {"at": 2}, f"loaded the half-written checkpoint: {found}"
    assert states_equal(model.state_dict(), weights), "weights are not those of the last complete checkpoint"


def test_stale_tmp_directory_is_cleaned_by_the_next_save(tmp_path, trained):
    model, optimizer = trained
    (tmp_path / "ckpt-0000004.tmp").mkdir(parents=True)
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=5, state={})
    assert not (tmp_path / "ckpt-0000004.tmp").exists(), "a killed write's temp dir was left behind"


def test_keep_one_deletes_older_checkpoints(tmp_path, trained):
    model, optimizer = trained
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=step, state={}, keep=1)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["ckpt-0000003"], f"keep=1 should leave only the newest checkpoint, found {names}"


def test_keep_two_keeps_the_two_newest(tmp_path, trained):
    model, optimizer = trained
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=step, state={}, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["ckpt-0000002", "ckpt-0000003"], f"keep=2 kept {names}"


def test_rerun_from_scratch_never_deletes_the_checkpoint_just_written(tmp_path, trained):
    """A stage re-run (no resume) in a directory holding a later checkpoint of an earlier run."""
    model, optimizer = trained
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=400, state={"run": "old"})
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=100, state={"run": "new"})
    found = load_latest(tmp_path, model=model, optimizer=optimizer)
    assert (found.step, found.state) == (100, {"run": "new"}), f"latest is not the new run's checkpoint: {found}"
    assert not (tmp_path / "ckpt-0000400").exists(), "the earlier run's later checkpoint should be pruned"


def test_lora_checkpoint_holds_only_adapters(tmp_path):
    model = tiny_qwen()
    apply_lora(model, rank=2, alpha=4)
    optimizer = build_optimizer(lora_parameters(model), lr=1e-2)
    final = save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, state={})
    keys = torch.load(final / "model.pt", weights_only=True).keys()
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys), f"non-adapter keys saved: {list(keys)[:3]}"


def test_lora_checkpoint_loads_back(tmp_path):
    model = tiny_qwen()
    apply_lora(model, rank=2, alpha=4)
    optimizer = build_optimizer(lora_parameters(model), lr=1e-2)
    train_one_step(model, optimizer)   # B is no longer zero
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, state={})
    fresh = tiny_qwen()
    apply_lora(fresh, rank=2, alpha=4)
    load_latest(tmp_path, model=fresh, optimizer=build_optimizer(lora_parameters(fresh), lr=1e-2))
    assert states_equal(lora_state_dict(fresh), adapters), "adapter weights not restored"
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_B")), "test needs trained B"


def test_mismatched_architecture_raises_clearly(tmp_path, trained):
    model, optimizer = trained
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, state={})
    other = tiny_qwen(layers=3)
    with pytest.raises(RuntimeError, match="does not match the model"):
        load_latest(tmp_path, model=other, optimizer=build_optimizer(other.parameters(), lr=1e-2))


def test_mismatched_shapes_raise_clearly_and_leave_the_model_untouched(tmp_path, trained):
    model, optimizer = trained
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, state={})
    other = tiny_qwen(hidden=64)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match="does not match the model"):
        load_latest(tmp_path, model=other, optimizer=build_optimizer(other.parameters(), lr=1e-2))
    assert states_equal(other.state_dict(), before), "a failed load must not change the model"


def test_full_checkpoint_into_a_lora_model_raises(tmp_path, trained):
    model, optimizer = trained
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, state={})
    lora_model = tiny_qwen()
    apply_lora(lora_model, rank=2, alpha=4)
    with pytest.raises(RuntimeError, match="does not match the model"):
        load_latest(tmp_path, model=lora_model, optimizer=build_optimizer(lora_parameters(lora_model), lr=1e-2))
