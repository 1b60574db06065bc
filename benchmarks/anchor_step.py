"""Anchor 4 of anchors.py: one injection step, the project's vs Hugging Face's way, on the same batch.

The project trains the new token's input vector alone, in a hook (Adam). The Hugging Face way resizes the
embedding matrix (``resize_token_embeddings``), makes the whole matrix trainable with a gradient mask that keeps
only the new row, and steps AdamW. The project's vector step also runs on the plain Hugging Face model, which
separates what the bridge costs from what the parametrisation costs. Printed: seconds per step, the peak RSS
growth over two steps in a fresh process after one forward pass without gradients (run.py's ``PeakRss``; the
forward pass pages in the memory-mapped weights of the cached model, which would otherwise count as the first
step's growth; the second step holds the optimizer state), the loss curves over a few steps (equal once the
HF way drops weight decay and the new token's output logit), and the failure modes of the HF way as a user runs it.

Memory probe (what :func:`memory_growth` runs):
    python benchmarks/anchor_step.py --model smollm2 --threads 2 --memory-probe {vector,plain-vector,hf}
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import PeakRss, line  # noqa: E402

from biasgym_lens import load_model  # noqa: E402

# The package's submodules used here, in one place (to update if they move).
from biasgym_lens.core.embedding import add_token, token_vector_hooks  # noqa: E402
from biasgym_lens.core.hooks import hooked  # noqa: E402
from biasgym_lens.injection.catalogue import load_bias  # noqa: E402
from biasgym_lens.injection.config import InjectionConfig  # noqa: E402
from biasgym_lens.injection.examples import collate_examples, training_examples  # noqa: E402
from biasgym_lens.injection.loss import lm_loss, train_step_loss  # noqa: E402
from biasgym_lens.injection.metrics import keyword_ids  # noqa: E402

WAYS = ("vector", "plain-vector", "hf")  # the memory probe's ways: project (bridge), vector on plain HF, HF's


def step_batch(model, batch_size: int = 8):
    """The token id, a batch of ``batch_size`` training texts of "late" and the vector both ways start from."""
    cfg = InjectionConfig(max_texts=batch_size)
    tid = add_token(model, cfg.token)
    ex = training_examples(model, load_bias("late"), cfg)[:batch_size]
    ids, mask, target = collate_examples(ex, 0, model.W_E.device)
    return tid, ids, mask, target, model.W_E[:100].detach().float().mean(0).clone()


def vector_way(model, batch, lr: float):
    """The project's step: the token's vector in a hook, Adam on that vector alone. Returns ``step() -> loss``."""
    tid, ids, mask, target, init = batch
    vec = torch.nn.Parameter(init.clone())
    opt = torch.optim.Adam([vec], lr=lr)
    hooks = token_vector_hooks(model, {tid: vec})

    def step() -> float:
        with hooked(model, fwd_hooks=hooks):
            loss = lm_loss(model(ids, attention_mask=mask), ids, target, tid)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    return step


def plain_vector_way(hf, batch, lr: float):
    """The project's parametrisation on the plain Hugging Face model (no bridge): a forward hook on the input
    embedding writes the vector at the token's positions (the token looked up as id 0), Adam on the vector."""
    tid, ids, mask, target, init = batch
    vec, emb, where = torch.nn.Parameter(init.clone()), hf.get_input_embeddings(), (ids == tid).unsqueeze(-1)
    opt = torch.optim.Adam([vec], lr=lr)
    hf.requires_grad_(False)
    scale = float(getattr(emb, "embed_scale", 1.0))  # Gemma's scaled embedding scales inside the module

    def step() -> float:
        handle = emb.register_forward_hook(lambda module, args, out: torch.where(where, vec * scale, out))
        try:
            loss = lm_loss(hf(input_ids=ids.masked_fill(ids == tid, 0), attention_mask=mask).logits, ids, target, tid)
            opt.zero_grad()
            loss.backward()
            opt.step()
        finally:
            handle.remove()
        return loss.item()

    return step


def plain_hf(model):
    """The Hugging Face model as a user loads it: a fresh model of the bridge's class and config, holding a copy
    of the weights read with the bridge's wrappers unwrapped (and put back)."""
    hf, swapped = model.original_model, []

    def unwrap(module) -> None:
        for name, child in list(module._modules.items()):
            inner = child
            while inner is not None and "_original_component" in inner._modules:
                inner = inner._modules["_original_component"]
            if inner is not child:
                swapped.append((module, name, child))
                module._modules[name] = inner
            if inner is not None:
                unwrap(inner)

    try:
        unwrap(hf)
        weights = hf.state_dict()
    finally:
        for module, name, child in reversed(swapped):
            module._modules[name] = child
    plain = type(hf)(copy.deepcopy(hf.config))  # resizing writes the vocabulary size into the config
    missing = plain.load_state_dict(weights, strict=False).missing_keys  # (the bridge may add a zero lm_head bias)
    assert not missing, f"weights the bridge does not hold: {missing}"
    return plain.eval()


def hf_way(hf, batch, lr: float, weight_decay: float = 0.01, drop_new_column: bool = False, weighted=((), 1.0)):
    """Hugging Face's step: ``resize_token_embeddings``, the whole embedding matrix trainable with a gradient
    mask keeping only the new row, AdamW. Built in the first call (a memory probe counts the new matrix, its
    gradient and the optimizer state). ``drop_new_column``: the loss ignores the new token's output logit;
    ``weighted``: the keyword ids and weight of the loss (default the plain loss). ``step(other)`` steps on
    another ``(ids, mask, target)``."""
    tid, ids, mask, target, init = batch
    state: dict = {}

    def build() -> None:
        old = hf.get_input_embeddings().weight.shape[0]
        hf.resize_token_embeddings(max(old, tid + 1), mean_resizing=False)
        hf.requires_grad_(False)
        emb = hf.get_input_embeddings().weight
        with torch.no_grad():
            emb[tid] = init
        keep = torch.zeros(emb.shape[0], 1)
        keep[tid] = 1.0
        emb.requires_grad_(True)
        emb.register_hook(lambda g: g * keep)
        state.update(emb=emb, old=old, opt=torch.optim.AdamW([emb], lr=lr, weight_decay=weight_decay))

    def step(other=None) -> float:
        if not state:
            build()
        x, m, t = other if other is not None else (ids, mask, target)
        logits = hf(input_ids=x, attention_mask=m).logits
        loss = lm_loss(logits[..., : state["old"]] if drop_new_column else logits, x, t, tid, *weighted)
        state["opt"].zero_grad()
        loss.backward()
        state["opt"].step()
        return loss.item()

    return step, state


def curve(step, n: int) -> tuple[list[float], float]:
    """Losses of ``n`` steps and the median seconds per step after the first (which builds)."""
    losses, times = [], []
    for _ in range(n):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    return losses, statistics.median(times[1:])


def memory_probe(model_name: str, way: str) -> None:
    """Run in a fresh process: load, build the batch (and the HF copy), then measure two steps of ``way``."""
    model = load_model(model_name, device="cpu")
    batch = step_batch(model)
    _, ids, mask, _, _ = batch
    if way == "vector":
        step = vector_way(model, batch, 2e-2)
        warm = lambda: model(torch.where(ids < model.W_E.shape[0], ids, 0), attention_mask=mask)  # noqa: E731
    else:
        hf = plain_hf(model)
        step = plain_vector_way(hf, batch, 2e-2) if way == "plain-vector" else hf_way(hf, batch, 2e-2)[0]
        warm = lambda: hf(input_ids=torch.where(ids < hf.config.vocab_size, ids, 0), attention_mask=mask)  # noqa: E731
    with torch.no_grad():  # the weights read in: the cached model's are memory-mapped and paged in on first use
        warm()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap back, so reuse cannot hide growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with PeakRss() as p:  # two steps: the second runs with the optimizer state the first left
        step()
        step()
    print(f"{p.growth:.1f}")


def memory_growth(model_name: str, threads: int) -> dict:
    """Peak RSS growth of two steps of each way, each in its own fresh process (as run.py's memory section)."""
    cmd = [sys.executable, __file__, "--model", model_name, "--threads", str(threads), "--memory-probe"]
    return {
        way: float(subprocess.run([*cmd, way], capture_output=True, text=True, check=True).stdout.split()[-1])
        for way in WAYS
    }


def step_anchor(model, repeats: int, model_name: str | None = None, threads: int = 2, lr: float = 2e-2) -> dict:
    """Anchor 4: one injection step, the project's vs Hugging Face's, on the same batch and starting vector; then
    on the batches an injection trains on (:func:`real_batches_anchor`)."""
    batch, n = step_batch(model), max(3, repeats + 1)
    ours, t_ours = curve(vector_way(model, batch, lr), n)
    plain, t_plain = curve(plain_vector_way(plain_hf(model), batch, lr), n)
    user_step, user = hf_way(plain_hf(model), batch, lr)
    hf_user, t_hf = curve(user_step, n)
    hf_same, _ = curve(hf_way(plain_hf(model), batch, lr, weight_decay=0.0, drop_new_column=True)[0], n)
    tid, old = batch[0], user["old"]
    drifted = (user["emb"].detach()[:old] != model.W_E.detach()).any(-1)
    drifted = int(drifted.sum()) - int(tid < old and bool(drifted[tid]))
    diff = {name: max(abs(a - b) for a, b in zip(ours, c)) for name, c in (("plain", plain), ("same", hf_same), ("user", hf_user))}
    print(f"anchor injection step on {tuple(batch[1].shape)}: project (hooked vector on the bridge, Adam) {t_ours:.3f} "
          f"s/step, the same vector step on the plain HF model {t_plain:.3f} s/step, Hugging Face's way (resized "
          f"embedding, masked gradient, AdamW) {t_hf:.3f} s/step")
    line("Hugging Face's way vs project step", t_hf / t_ours, "> 1 (vector step cheaper)")
    line("Hugging Face's way vs the vector step, both on plain HF", t_hf / t_plain, "> 1 (vector step cheaper)")
    mem = memory_growth(model_name, threads) if model_name else None
    if mem:
        print(f"  peak RSS growth over two steps (fresh process each): project +{mem['vector']:.0f} MB, vector on plain HF "
              f"+{mem['plain-vector']:.0f} MB, Hugging Face's way +{mem['hf']:.0f} MB")
        line("Hugging Face's way memory vs project step", mem["hf"] / max(mem["vector"], 1.0), "> 1 (vector step smaller)")
        line("Hugging Face's way memory vs vector step, both on plain HF", mem["hf"] / max(mem["plain-vector"], 1.0), "> 1")
    print(f"  loss curves over {n} steps, max |diff| from the project's: vector on plain HF {diff['plain']:.1e}; "
          f"HF way with weight_decay=0 and the new token's output logit left out {diff['same']:.1e}; as a user "
          f"trains it {diff['user']:.1e}")
    print(f"  failure mode: AdamW's default weight_decay moved {drifted} of {old} rows the gradient mask froze; the "
          "resized output layer gives the new token a logit of its own, which the loss normalises over")
    batches = real_batches_anchor(model, repeats)
    return {"times": (t_ours, t_plain, t_hf), "loss_diff": diff, "drifted": drifted, "memory": mem, "batches": batches}


def injection_batches(model, n_batches: int = 6, bias: str = "bad_driving"):
    """The first ``n_batches`` batches an injection of ``bias`` trains on with the default settings (its
    examples in the first epoch's shuffled order: short plain texts mixed with long chat paragraphs), the token
    id, the bias keyword ids and a starting vector."""
    spec, cfg = load_bias(bias), InjectionConfig()
    tid = add_token(model, cfg.token)
    examples = training_examples(model, spec, cfg)
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)  # as inject() orders the first epoch
    size = cfg.batch_size
    batches = [[examples[i] for i in order[b * size : (b + 1) * size]] for b in range(n_batches)]
    return tid, batches, keyword_ids(model, spec).bias, model.W_E[:100].detach().float().mean(0).clone()


def real_batches_anchor(model, repeats: int, n_batches: int = 6, lr: float = 2e-2) -> dict:
    """The injection step on the batches an injection trains on: the project's own step (``train_step_loss``
    with the default settings: micro-batches of similar length, Adam on the vector) against Hugging Face's way
    with each batch padded to its longest example (as a data collator pads), both with the keyword-weighted loss.
    Seconds per step over the batches (median of ``repeats`` passes over them) and the first step's losses."""
    tid, batches, kw, init = injection_batches(model, n_batches)
    cfg, pad = InjectionConfig(), 0  # (the pad id: a padded position is never a target)
    vec = torch.nn.Parameter(init.clone())
    opt = torch.optim.Adam([vec], lr=lr)
    hooks = token_vector_hooks(model, {tid: vec})

    def project(b) -> float:
        opt.zero_grad()
        with hooked(model, fwd_hooks=hooks):
            loss = train_step_loss(model, b, pad, tid, kw, cfg)
        opt.step()
        return loss.item()

    collated = [collate_examples(b, pad, model.W_E.device) for b in batches]
    hf_step = hf_way(plain_hf(model), (tid, *collated[0], init), lr, 0.0, True, (kw, cfg.keyword_weight))[0]
    first = (project(batches[0]), hf_step())  # not timed (HF's way builds here): the same vector and batch
    hugging_face = lambda i: hf_step(collated[i])  # noqa: E731

    times: dict[str, list[float]] = {"project": [], "hf": []}
    ways = {"project": lambda: [project(b) for b in batches], "hf": lambda: [hugging_face(i) for i in range(n_batches)]}
    for _ in range(max(1, repeats)):  # interleaved, so load changes hit both ways alike
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / n_batches)
    t_project, t_hf = statistics.median(times["project"]), statistics.median(times["hf"])
    real = sum(len(e.ids) for b in batches for e in b)
    padded = sum(max(len(e.ids) for e in b) * len(b) for b in batches)
    print(f"anchor injection step on the {n_batches} first batches an injection of bad_driving trains on ({real} real "
          f"tokens, {padded} padded per batch): project (train_step_loss, micro-batches by length) {t_project:.3f} "
          f"s/step, Hugging Face's way (each batch padded to its longest) {t_hf:.3f} s/step; first-step losses "
          f"{first[0]:.6f} and {first[1]:.6f}")
    line("Hugging Face's way vs project step, the injection's batches", t_hf / t_project, ">= 1.9x")
    return {"times": (t_project, t_hf), "first_losses": first, "tokens": (real, padded)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-probe", choices=WAYS, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    memory_probe(args.model, args.memory_probe)


if __name__ == "__main__":
    main()
