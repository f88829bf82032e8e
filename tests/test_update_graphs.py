"""The update's micro-step as a CUDA graph (ppo/graphs.py, train.update_graphs; issue 20): the rollout's rows copied
into static buffers, a 4D attention mask built outside the step, the `.grad` tensors the graph adds into put back
after every zero_grad. On the CPU nothing is recorded: the same buffers, mask and gradient tensors run op by op, and
a run through them is the run the trainer makes without them. On CUDA the step is recorded and replayed."""

from __future__ import annotations

import pytest
import torch
from test_estimators import RECORDED_GAE, tiny_trainer, updates

from hfalign.ppo import graphs
from hfalign.ppo.graphs import GraphedMicroStep
from hfalign.ppo.policy_value import FP32Head


@pytest.fixture
def static_buffers(monkeypatch):
    """The trainer takes its graphed path on this device (on the CPU: static buffers, op by op); counts the calls."""
    calls = []
    monkeypatch.setattr(graphs, "update_problem", lambda *a, **k: None)
    call = GraphedMicroStep.__call__

    def counted(self, idx):
        calls.append(self)
        return call(self, idx)

    monkeypatch.setattr(GraphedMicroStep, "__call__", counted)
    return calls


def test_static_buffers_reproduce_the_recorded_gae_run(tiny_model, tmp_path, static_buffers):
    """Prompts of several lengths (left padding: the 4D mask's padding rows), two updates: the metrics recorded before
    any of this existed (test_estimators), at the same 1e-5."""
    trainer = tiny_trainer(tiny_model, tmp_path, generation="hf")
    trainer.train()
    assert len({id(s) for s in static_buffers}) == 2 and len(static_buffers) == 2 * trainer.plan.optimizer_steps_per_update
    for got, want in zip(updates(trainer), RECORDED_GAE, strict=True):
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def _lora_run(tiny_model, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    trainer = tiny_trainer(tiny_model, tmp_path, peft_config=lora, value=False, gradient_accumulation_steps=2,
                           per_device_train_batch_size=2, learning_rate=3e-3, generation="hf")
    assert trainer.adaptive_lr and trainer.vocab_kl_coef  # LoRA's step controls: the snapshot/undo and a ref pass
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return updates(trainer), params


def test_lora_shared_base_with_accumulation_is_the_same_run(tiny_model, tmp_path, monkeypatch):
    """The shared base switches adapters inside the step (policy, value, and the reference pass of the tail KL), two
    micro-batches accumulate into one optimizer step, the trust region snapshots and may undo a step: through the
    static buffers the trainable weights and every metric come out as op by op."""
    eager_metrics, eager = _lora_run(tiny_model, tmp_path / "eager")
    calls = []
    monkeypatch.setattr(graphs, "update_problem", lambda *a, **k: None)
    call = GraphedMicroStep.__call__
    monkeypatch.setattr(GraphedMicroStep, "__call__", lambda self, idx: calls.append(1) or call(self, idx))
    graphed_metrics, graphed = _lora_run(tiny_model, tmp_path / "graphed")
    assert calls and any(".value." in n for n in graphed) and any(".default." in n for n in graphed)
    for n, p in eager.items():
        torch.testing.assert_close(graphed[n], p, rtol=1e-5, atol=1e-7, msg=n)
    moved = [n for n, p in eager.items() if "lora_B" in n and p.abs().sum() > 0]
    assert moved  # the run trained the adapters (lora_B starts at zero)
    for got, want in zip(graphed_metrics, eager_metrics, strict=True):
        for k in ("policy/approxkl_avg", "loss/policy_avg", "loss/value_avg", "policy/vocab_kl", "train/lr_scale"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def test_causal_mask_is_what_the_model_builds_for_left_padding(tiny_model):
    """Outputs at real positions through the 4D mask equal the model's own from the 2D padding mask; no row is empty
    (a padding position sees itself)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    ids = torch.randint(3, 100, attn.shape)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    mask = graphs.causal_mask(attn)
    assert mask.shape == (3, 1, 5, 5) and mask.dtype == torch.bool and mask.any(-1).all()
    assert not mask[0, 0, 2:, :2].any()  # real positions never see padding
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        additive = graphs.causal_mask(attn, torch.float32)
        model.config._attn_implementation = "eager"
        eager = model(input_ids=ids, attention_mask=additive, position_ids=pos).logits
    real = attn.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager[real], want[real], rtol=1e-5, atol=1e-5)


def test_where_the_update_cannot_be_a_graph_it_says_why(tiny_model, tmp_path):
    trainer = tiny_trainer(tiny_model, tmp_path)
    cuda, model = torch.device("cuda"), trainer.model  # update_problem reads the device's type only
    assert graphs.update_problem(model, cuda, deepspeed=False, processes=1) is None
    assert graphs.update_problem(model, torch.device("cpu"), False, 1) == "not on CUDA"
    assert "DDP" in graphs.update_problem(model, cuda, False, 2)
    assert "DeepSpeed" in graphs.update_problem(model, cuda, True, 1)
    assert "fp32 LoRA adapters" in graphs.update_problem(model, cuda, False, 1, "bf16")  # weights autocast would cast
    model.to(torch.bfloat16)
    heads = [m for m in model.critic.modules() if isinstance(m, FP32Head)]
    assert heads and all(h.float().weight.dtype == torch.float32 for h in heads)  # computes outside autocast: may stay
    assert graphs.update_problem(model, cuda, False, 1, "bf16") is None  # stored in bf16: what the H200 ran
    assert "fp16" in graphs.update_problem(model, cuda, False, 1, "fp16")
    model.activation_checkpointing_enable()
    assert "checkpointing" in graphs.update_problem(model, cuda, False, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-accumulating"])
def test_recorded_update_matches_op_by_op_on_cuda(tiny_model, tmp_path, lora):
    """On a GPU: one update whose micro-steps are recorded and replayed gives the op-by-op update's weights and stats
    (fp32). Full fine-tuning with one micro-batch per step (the `fresh` graph only); a LoRA shared base with two
    micro-batches per step (`accumulate` too), the trust region's snapshots and the reference pass of the tail KL.
    Plain SGD: Adam would turn the last-bit noise of tiny gradients into whole learning-rate steps."""
    from peft import LoraConfig

    def run(graphed: bool, out):
        extra = dict(peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                     value=False, per_device_train_batch_size=2, gradient_accumulation_steps=2) if lora else {}
        trainer = tiny_trainer(tiny_model, out, update_graphs=graphed, generation="hf", optim="sgd", total_episodes=8,
                               learning_rate=1e-2, **extra)
        trainer.train()
        assert (trainer.update_graph_problem is None) == graphed, trainer.update_graph_problem
        return updates(trainer), {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}

    replays = []
    replay = torch.cuda.CUDAGraph.replay
    torch.cuda.CUDAGraph.replay = lambda self: replays.append(1) or replay(self)
    try:
        graphed_metrics, graphed = run(True, tmp_path / "graphed")
    finally:
        torch.cuda.CUDAGraph.replay = replay
    eager_metrics, eager = run(False, tmp_path / "eager")
    assert len(replays) == (8 if lora else 4)  # every micro-step: 2 epochs x 2 minibatches (x 2 micro-batches)
    for n, p in eager.items():
        torch.testing.assert_close(graphed[n], p, rtol=1e-4, atol=1e-6, msg=n)
    for got, want in zip(graphed_metrics, eager_metrics, strict=True):
        for k in ("loss/policy_avg", "policy/approxkl_avg", "loss/value_avg", "policy/entropy_avg"):
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-7), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fp32_lora_under_bf16_autocast_records(tiny_model, tmp_path, monkeypatch):
    """fp32 LoRA adapters under bf16 autocast did not record on an H200 (issue 20; the warm-up was then once per
    process, now per model), so update_problem keeps such runs op by op. Forced through here: a pass says they may be
    let through; a failure is reported as xfail with the capture's own message (pytest -rx)."""
    from peft import LoraConfig

    from hfalign.errors import UserError

    monkeypatch.setattr(graphs, "update_problem", lambda *a, **k: None)
    trainer = tiny_trainer(tiny_model, tmp_path, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                           task_type="CAUSAL_LM"), value=False, generation="hf", total_episodes=8, bf16=True)
    try:
        trainer.train()
    except UserError as e:
        pytest.xfail(f"still not recorded: {e}")
