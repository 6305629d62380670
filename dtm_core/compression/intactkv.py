"""IntactKV (Liu et al., ACL 2024): the compressed model runs with the dense model's KV cache for the
first "pivot" tokens and its own weights for everything after.

Mechanism. :class:`PivotCache` is a transformers ``DynamicCache`` whose first ``update`` per layer
replaces the keys and values at the pivot columns by given ones (the dense model's, from the same
batch layout, or calibrated ones). Hidden states at pivot positions in the compressed run are then
never seen by any later position (attention reads them only through the replaced K/V and the MLP
works per position), so one forward pass of the full sequence computes exactly what the compressed
model would compute continuing from the dense model's pivot cache, for any K per row and any
padding. Outputs *at* pivot positions belong to the dense model (it computed those positions): with
K equal to the whole prompt, the first continuation token is the dense model's prediction and the
compressed model decodes from the dense prompt cache ("dense prefill, compressed decode").

Sliding-window layers (Mistral, Qwen2, Gemma-2/3, ...): IntactKV means that the compressed model
continues from the dense model's cache of the pivot tokens. A sliding layer attends to the dense
pivot K/V while they lie inside its window and, exactly like the model itself, not once the window
has moved past them; full-attention layers always do. The dense pivot K/V are taken from the dense
pass as computed (:class:`RecordingCache`), never from a sliding layer's cache storage, which has
dropped the first tokens by the end of a long prompt.

Variants: ``IntactKV(k=K)`` keeps the first K tokens of every input ([BOS] when the tokenizer adds
one, IntactKV[B] for K=1), ``IntactKV(prefix=True)`` keeps the chat template's system prefix
(IntactKV[P]). :func:`calibrate` trains the pivot KV (all weights frozen) to minimise the MSE between
the compressed and the dense model's decoder-layer outputs (IntactKV + Cal).
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from dtm_core import METRIC_VERSION
from dtm_core.models import hooks
from dtm_core.models.components import decoder_layers
from dtm_core.errors import DTMError
from dtm_core.models.generation import model_device, pad_id_of, right_padded, teacher_forced
from dtm_core.models.load import cache_root

Progress = Callable[[float, str], None]


@dataclass(frozen=True, eq=False)
class CalibratedKV:
    """Trained pivot keys/values for one token prefix, per layer of shape (heads, K, head_dim).

    Compared (and hashed) by identity: field-wise equality would compare tensors.
    """

    ids: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    steps: int = 0

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file
        tensors = {f"k{i}": k.contiguous() for i, k in enumerate(self.keys)}
        tensors.update({f"v{i}": v.contiguous() for i, v in enumerate(self.values)})
        meta = {"ids": json.dumps(list(self.ids)), "loss_before": repr(self.loss_before),
                "loss_after": repr(self.loss_after), "steps": str(self.steps)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "CalibratedKV":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
            n = sum(1 for k in fh.keys() if k.startswith("k"))
            keys = tuple(fh.get_tensor(f"k{i}") for i in range(n))
            values = tuple(fh.get_tensor(f"v{i}") for i in range(n))
        return cls(ids=tuple(json.loads(meta["ids"])), keys=keys, values=values,
                   loss_before=float(meta["loss_before"]), loss_after=float(meta["loss_after"]),
                   steps=int(meta["steps"]))


@dataclass(frozen=True)
class IntactKV:
    """Which input tokens keep the dense model's KV: the first ``k``, or the chat system prefix."""

    k: int = 0
    prefix: bool = False
    calibrated: CalibratedKV | None = None

    @classmethod
    def parse(cls, text) -> "IntactKV | None":
        """``None``/"off"/"0" -> off; "prefix"; a positive integer K."""
        if text is None or isinstance(text, IntactKV):
            return text
        s = str(text).strip().lower()
        if s in ("", "off", "none", "0", "false"):
            return None
        if s in ("prefix", "p", "system"):
            return cls(prefix=True)
        if s in ("b", "bos"):
            return cls(k=1)
        try:
            k = int(s)
        except ValueError:
            raise DTMError(f"IntactKV must be off, a number of first tokens K (e.g. 1) or "
                           f"'prefix' (the chat template's system prefix), not '{text}'.") from None
        if k < 0:
            raise DTMError("IntactKV K must be a positive number of tokens.")
        return cls(k=k) if k else None

    @property
    def label(self) -> str:
        base = "prefix" if self.prefix else str(self.k)
        return base + ("+cal" if self.calibrated is not None else "")

    def with_calibration(self, cal: CalibratedKV | None) -> "IntactKV":
        return IntactKV(k=self.k, prefix=self.prefix, calibrated=cal)

    def prefill(self, decoder, dense_model, ks: Sequence[int]) -> torch.Tensor:
        """A :class:`~dtm_core.models.generation.GreedyDecoder`'s prefill with this setting's pivot KV."""
        return intact_prefill(decoder, dense_model, ks, self)

    def pivot_lengths(self, tokenizer, prompt_ids: Sequence[Sequence[int]]) -> list[int]:
        """K for each prompt: how many of its first tokens keep the dense (or calibrated) KV."""
        if self.calibrated is not None:
            ids = list(self.calibrated.ids)
            for i, p in enumerate(prompt_ids):
                if list(p[:len(ids)]) != ids:
                    raise DTMError(f"Prompt {i} does not start with the calibrated pivot tokens "
                                   f"{tokenizer.decode(ids)!r}; calibrate on prompts with the "
                                   "same prefix (same chat template setting).")
            return [len(ids)] * len(prompt_ids)
        if self.prefix:
            pre = chat_prefix_ids(tokenizer)
            out = []
            for p in prompt_ids:
                n = 0
                while n < min(len(p), len(pre)) and p[n] == pre[n]:
                    n += 1
                if n == 0:
                    raise DTMError("IntactKV 'prefix' keeps the chat template's system prefix, "
                                   "but the prompts do not start with it: turn the chat "
                                   "template on, or give a number of tokens K.")
                out.append(n)
            return out
        return [min(self.k, len(p)) for p in prompt_ids]


def chat_prefix_ids(tokenizer) -> list[int]:
    """Tokens every chat-template prompt starts with (system prompt and role header)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DTMError("IntactKV 'prefix' needs a chat template; this tokenizer has none. Give a "
                       "number of tokens K instead.")
    renders = []
    for content in ("Hello there.", "7 + 5 = ?", "Zebras"):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
        renders.append(tokenizer(text, add_special_tokens=False).input_ids)
    n = 0
    while all(n < len(r) for r in renders) and len({r[n] for r in renders}) == 1:
        n += 1
    if n == 0:
        raise DTMError("The chat template puts no common prefix before the user's text.")
    return list(renders[0][:n])


def describe_pivots(tokenizer, ids: Sequence[int], k: int) -> str:
    """One sentence naming the pivot tokens (which matters when the tokenizer adds no BOS)."""
    toks = [tokenizer.decode([t]) for t in ids[:k]]
    shown = ", ".join(repr(t) for t in toks[:12]) + (", ..." if len(toks) > 12 else "")
    bos = getattr(tokenizer, "bos_token_id", None)
    has_bos = bos is not None and len(ids) and ids[0] == bos
    note = ("" if has_bos else " This tokenizer puts no BOS token first, so these are the "
            "prompt's own first tokens.")
    return f"IntactKV keeps the dense KV of the first {k} token{'s' * (k != 1)}: {shown}.{note}"


class PivotCache(DynamicCache):
    """A DynamicCache whose first update per layer puts given K/V at the pivot columns.

    ``mask`` is (B, T0) over the first forward's first T0 columns; ``source(layer_idx)`` returns
    (keys, values) of shape (B, heads, T0, head_dim) (they may carry gradients).
    """

    def __init__(self, config, mask: torch.Tensor, source: Callable[[int], tuple],
                 model=None):
        from dtm_core.compression.kvcache import stored_quantizers

        super().__init__(config=config)
        self.pivot_mask = mask
        self.source = source
        self._replaced: set[int] = set()
        # a quantized KV cache (kv: specs) of ``model``: entries quantized as they are stored,
        # the pivot entries kept dense
        self.quant = stored_quantizers(model) if model is not None else {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        quant = self.quant.get(layer_idx)
        if quant:
            if quant.get("k") is not None:
                key_states = quant["k"](key_states)
            if quant.get("v") is not None:
                value_states = quant["v"](value_states)
        if layer_idx not in self._replaced:
            self._replaced.add(layer_idx)
            k_src, v_src = self.source(layer_idx)
            t0 = self.pivot_mask.shape[1]
            if k_src.shape != key_states[:, :, :t0].shape:
                raise DTMError("IntactKV needs the dense and the compressed model to have the same "
                               f"attention shapes (layer {layer_idx}: {tuple(k_src.shape)} vs "
                               f"{tuple(key_states[:, :, :t0].shape)}).")
            m = self.pivot_mask[:, None, :, None].to(key_states.device)
            # .to: with device maps the two models' layers may sit on different devices
            k_src = k_src.to(key_states.device, key_states.dtype)
            v_src = v_src.to(value_states.device, value_states.dtype)
            key_states = torch.cat([torch.where(m, k_src, key_states[:, :, :t0]),
                                    key_states[:, :, t0:]], 2)
            value_states = torch.cat([torch.where(m, v_src,
                                                  value_states[:, :, :t0]),
                                      value_states[:, :, t0:]], 2)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if quant:
            from dtm_core.compression.kvcache import mark_stored

            if quant.get("k") is not None:
                keys = mark_stored(keys)
            if quant.get("v") is not None:
                values = mark_stored(values)
        return keys, values


class RecordingCache(DynamicCache):
    """A DynamicCache that keeps each layer's keys and values of the first ``width`` columns as
    its first update computed them. A sliding-window layer's cache drops the first tokens once
    the prompt is longer than its window, so the dense pivot K/V are read here, never from the
    cache's storage."""

    def __init__(self, config, width: int):
        super().__init__(config=config)
        self.width = width
        self.first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.first:
            self.first[layer_idx] = (key_states[:, :, :self.width].clone(),
                                     value_states[:, :, :self.width].clone())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def pivots(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.first[i] for i in sorted(self.first)]


def right_pad_mask(ks: Sequence[int], width: int) -> torch.Tensor:
    """(B, width) True at columns < K_i (right-padded rows start at column 0)."""
    return torch.arange(width)[None, :] < torch.tensor(list(ks))[:, None]


def pivot_source(ikv: IntactKV, dense_cache, starts: Sequence[int], width: int,
                 device) -> Callable[[int], tuple]:
    """The K/V a :class:`PivotCache` puts at the pivot columns, over the first ``width`` columns.

    Calibrated: the trained K/V placed at columns starts[i].. of row i (built per layer when
    asked). Otherwise the dense model's, from the :class:`RecordingCache` of a dense pass of the
    same batch layout (its first ``width`` columns, kept apart from the cache's storage, so the
    rest of that cache can be freed).
    """
    cal = ikv.calibrated
    if cal is None:
        return dense_cache.pivots().__getitem__
    kk = len(cal.ids)

    def source(layer_idx):
        out = []
        for t in (cal.keys[layer_idx], cal.values[layer_idx]):
            h, _, d = t.shape
            full = torch.zeros((len(starts), h, width, d), dtype=t.dtype, device=device)
            for i, s in enumerate(starts):
                full[i, :, s:s + kk] = t.to(device)
            out.append(full)
        return tuple(out)
    return source


@torch.no_grad()
def teacher_forced_pair(dense_model, comp_model, seqs: Sequence[Sequence[int]], pad_id: int,
                        ks: Sequence[int], ikv: IntactKV
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense and IntactKV-compressed logits (B, T, V) of right-padded sequences.

    The dense pass keeps its KV cache; the compressed pass gets the dense (or calibrated) K/V at
    columns < K_i of row i, and its logits there are replaced by the dense model's.
    """
    t0 = max(ks)
    rec = RecordingCache(dense_model.config, t0)
    d_out = teacher_forced(dense_model, seqs, pad_id, use_cache=True, past_key_values=rec)
    d_logits = d_out.logits
    source = pivot_source(ikv, rec, [0] * len(seqs), t0, model_device(comp_model))
    del d_out
    cache = PivotCache(comp_model.config, right_pad_mask(ks, t0), source, comp_model)
    c_logits = teacher_forced(comp_model, seqs, pad_id, past_key_values=cache,
                              use_cache=True).logits.to(d_logits.device)
    keep = right_pad_mask(ks, c_logits.shape[1]).to(c_logits.device)
    c_logits = torch.where(keep[..., None], d_logits, c_logits)
    return d_logits, c_logits


@torch.no_grad()
def intact_prefill(decoder, dense_model, ks: Sequence[int], ikv: IntactKV) -> torch.Tensor:
    """Prefill of a left-padded :class:`GreedyDecoder` on the compressed model with IntactKV.

    Returns the next-token logits (B, V); rows whose whole prompt is pivot take the dense model's.
    """
    ids, amask, pos = decoder.ids, decoder.mask, decoder.pos
    width = ids.shape[1]
    lens = amask.sum(-1).tolist()
    starts = [width - int(n) for n in lens]
    col = torch.arange(width, device=ids.device)[None, :]
    st = torch.tensor(starts, device=ids.device)[:, None]
    kt = torch.tensor(list(ks), device=ids.device)[:, None]
    mask = (col >= st) & (col < st + kt)
    rec = RecordingCache(dense_model.config, width)
    d_out = dense_model(input_ids=ids.to(model_device(dense_model)),
                        attention_mask=amask.to(model_device(dense_model)),
                        position_ids=pos.to(model_device(dense_model)), use_cache=True,
                        past_key_values=rec)
    source = pivot_source(ikv, rec, starts, width, ids.device)
    decoder.cache = PivotCache(decoder.model.config, mask, source, decoder.model)
    logits = decoder.forward(ids, pos)
    whole = torch.tensor([k >= n for k, n in zip(ks, lens)], device=logits.device)
    return torch.where(whole[:, None], d_out.logits[:, -1, :].to(logits.device), logits)


# --------------------------------------------------------------------------------------------
# Calibration (IntactKV + Cal)


def calibration_fingerprint(ikv: "IntactKV | None") -> str:
    """A short hash of calibrated pivot K/V ('' when not calibrated), for cache keys."""
    if ikv is None or ikv.calibrated is None:
        return ""
    h = hashlib.sha256(json.dumps(list(ikv.calibrated.ids)).encode())
    for t in ikv.calibrated.keys + ikv.calibrated.values:
        h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def calibration_key(pair, ids: Sequence[int], prompt_ids, steps: int, lr: float) -> str:
    h = hashlib.sha256()
    comp = pair.recipe.to_json() if pair.recipe is not None else pair.label
    h.update(json.dumps([pair.dense.fingerprint, comp, list(ids), steps, lr,
                         METRIC_VERSION]).encode())
    h.update(json.dumps([list(p) for p in prompt_ids]).encode())
    return h.hexdigest()[:24]


def calibrate(pair, prompt_ids: Sequence[Sequence[int]], ikv: IntactKV, *, steps: int = 50,
              lr: float = 1e-2, batch_size: int = 8, max_prompts: int = 32, cache_dir=None,
              progress: Progress | None = None, stop: threading.Event | None = None,
              use_cache: bool = True) -> CalibratedKV:
    """Train the pivot K/V (weights frozen) to minimise the mean over decoder layers of the MSE
    between compressed and dense layer outputs at the non-pivot positions of the prompts.

    The pivot tokens must be the same in every calibration prompt (the chat prefix, or a BOS).
    Adam; every tenth of the steps the loss over the whole set is checked, and a check that did
    not improve returns to the best K/V so far with half the learning rate. Returns the K/V with
    the lowest loss (the dense K/V if no step improved on them), cached on disk under the
    calibration's key.
    """
    note = progress or (lambda f, m: None)
    if steps < 1 or steps > 10000:
        raise DTMError("Calibration steps must be between 1 and 10000.")
    base = ikv.with_calibration(None)
    prompt_ids = [list(p) for p in prompt_ids][:max_prompts]
    if not prompt_ids:
        raise DTMError("Calibration needs at least one prompt.")
    ks = base.pivot_lengths(pair.tokenizer, prompt_ids)
    k = min(ks)
    pivot = prompt_ids[0][:k]
    if any(p[:k] != pivot for p in prompt_ids):
        raise DTMError("Calibrated IntactKV trains one pivot KV for all prompts, so their first "
                       f"{k} tokens must be the same; they differ here. Use 'prefix' with the chat "
                       "template (or a tokenizer that puts a BOS token first).")
    prompt_ids = [p for p in prompt_ids if len(p) > k]
    if not prompt_ids:
        raise DTMError("Every calibration prompt is only pivot tokens; nothing to calibrate on.")
    key = calibration_key(pair, pivot, prompt_ids, steps, lr)
    path = cache_root(cache_dir) / "intactkv" / f"{key}.safetensors"
    if use_cache and path.exists():
        try:
            note(1.0, "calibrated pivot KV loaded from the cache")
            return CalibratedKV.load(path)
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    dense, comp = pair.dense.model, pair.compressed
    dev = model_device(comp)
    pad = pad_id_of(pair.tokenizer)
    with torch.no_grad():
        rec = RecordingCache(dense.config, k)
        dense(input_ids=torch.tensor([pivot], device=model_device(dense)), use_cache=True,
              past_key_values=rec)
        init = [t[0].float().to(dev) for kv in rec.pivots() for t in kv]   # k0, v0, k1, v1, ...
    batches = [prompt_ids[s:s + batch_size] for s in range(0, len(prompt_ids), batch_size)]
    targets = []   # per batch: token ids, non-pivot real positions, dense layer outputs
    with torch.no_grad():
        for b in batches:
            ids = right_padded(b, pad)
            with hooks.outputs(decoder_layers(dense)) as store:
                dense(input_ids=ids.to(model_device(dense)), use_cache=False)
            live = torch.zeros(ids.shape, dtype=torch.bool)
            for j, s in enumerate(b):
                live[j, k:len(s)] = True
            targets.append((ids.to(dev), live.to(dev), [t.float().to(dev) for t in store]))
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = torch.optim.Adam(params, lr=lr)

    def batch_loss(bi: int) -> torch.Tensor:
        ids, live, tgt = targets[bi]
        rows = len(ids)
        mask = right_pad_mask([k] * rows, k).to(dev)

        def source(i):
            kk, vv = params[2 * i], params[2 * i + 1]
            return kk[None].expand(rows, -1, -1, -1), vv[None].expand(rows, -1, -1, -1)
        with hooks.outputs(decoder_layers(comp)) as store:
            comp(input_ids=ids, past_key_values=PivotCache(comp.config, mask, source, comp),
                 use_cache=True)
        m = live[..., None].float()
        n = m.sum() * tgt[0].shape[-1]
        return torch.stack([(((c.float() - d) ** 2) * m).sum() / n
                            for c, d in zip(store, tgt)]).mean()

    def full_loss() -> float:
        with torch.no_grad():
            return float(sum(batch_loss(i) * len(b) for i, b in enumerate(batches))
                         / len(prompt_ids))

    frozen = [(p, p.requires_grad) for p in list(comp.parameters()) + list(dense.parameters())]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        best = before = full_loss()
        best_params = [p.detach().clone() for p in params]
        note(0.0, f"calibration loss {before:.4g}")
        check_every = max(1, steps // 10)
        for step in range(steps):
            if stop is not None and stop.is_set():
                break
            opt.zero_grad()
            with torch.enable_grad():
                loss = batch_loss(step % len(batches))
                loss.backward()
            opt.step()
            if (step + 1) % check_every == 0 or step == steps - 1:
                cur = full_loss()
                if cur < best:
                    best, best_params = cur, [p.detach().clone() for p in params]
                else:  # overshot: back to the best point with half the step size
                    with torch.no_grad():
                        for p, b in zip(params, best_params):
                            p.copy_(b)
                    lr_now = opt.param_groups[0]["lr"] / 2
                    opt = torch.optim.Adam(params, lr=lr_now)
                note((step + 1) / steps, f"step {step + 1}/{steps}: loss {cur:.4g} "
                     f"(start {before:.4g}, best {best:.4g})")
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    cast = pair.dense.dtype if hasattr(pair.dense, "dtype") else torch.float32
    cal = CalibratedKV(ids=tuple(pivot),
                       keys=tuple(t.to(cast).cpu() for t in best_params[0::2]),
                       values=tuple(t.to(cast).cpu() for t in best_params[1::2]),
                       loss_before=before, loss_after=best, steps=steps)
    if use_cache and not (stop is not None and stop.is_set()):
        cal.save(path)
    return cal
