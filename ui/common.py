"""What every tab shares: the pair form (read into a typed request), the process-wide model cache,
per-session Stop signals, and prompt sets from the page."""
from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from dtm_core import DTMError
from dtm_core.models.generation import encode_prompts
from dtm_core.compression.intactkv import describe_pivots
from dtm_core.jobs import CalibrationSetting, IntactKVSetting, PairCache, PairRequest
from dtm_core.compression.methods import parse_spec, presets
from dtm_core.measure.prompts import builtin_names, load_prompts, parse_prompt_bytes

CACHE = PairCache()                 # process-wide: models are big and shared by every session
CUSTOM, CHECKPOINT = "custom spec", "second checkpoint"
EVALUATED = "prompts in use"        # the calibration policy's default, as the page names it


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def plain_text(text: str) -> str:
    """``text`` shown literally by a Markdown component: every Markdown character escaped
    (a recipe like ``int8@*.*`` stays ``int8@*.*``)."""
    return _MARKDOWN.sub(r"\\\1", text)


class StatusText(gr.Markdown):
    """A status line: text, never Markdown (user-provided specs, paths and prompts appear as
    typed)."""

    def postprocess(self, value):
        return super().postprocess(plain_text(value) if isinstance(value, str) else value)

    def get_block_name(self) -> str:
        return "markdown"          # the frontend draws it with Markdown's Svelte component


def preset_choices() -> list[str]:
    return presets() + [CUSTOM, CHECKPOINT]


def calibration_choices() -> list[str]:
    return [EVALUATED] + builtin_names()


@dataclass
class PairForm:
    """The pair row of the page: the components, in the order every handler receives them."""

    model: gr.Textbox
    preset: gr.Dropdown
    spec: gr.Textbox
    components: gr.Textbox
    checkpoint: gr.Textbox
    calibration: gr.Dropdown
    calibration_file: gr.File
    calib_ctx: gr.Number
    calib_samples: gr.Number
    sequential: gr.Checkbox

    @property
    def side(self) -> list:
        """The five inputs every API endpoint has taken from the start."""
        return [self.model, self.preset, self.spec, self.components, self.checkpoint]

    @property
    def calib(self) -> list:
        return [self.calibration, self.calibration_file, self.calib_ctx, self.calib_samples,
                self.sequential]


@dataclass
class IntactKVForm:
    pivots: gr.Dropdown
    calibrated: gr.Checkbox
    steps: gr.Slider

    @property
    def inputs(self) -> list:
        return [self.pivots, self.calibrated, self.steps]


def checkpoint_info(source, preset, spec, checkpoint) -> str:
    """What the checkpoint of the compressed side is (the second checkpoint, or the PATH of a
    ``from:PATH`` custom spec), as one Markdown paragraph; empty when the side names no
    checkpoint."""
    from dtm_core.models.checkpoints import inspect

    if preset == CHECKPOINT:
        path = (checkpoint or "").strip()
    elif preset == CUSTOM and (spec or "").strip().lower().startswith("from:"):
        path = spec.strip()[len("from:"):].strip()
    else:
        return ""
    if not path:
        return ""
    try:
        info = inspect(path, base=(source or "default").strip())
    except DTMError as exc:
        return plain_text(str(exc))
    lines = info.lines()       # one paragraph: the description must not push the prompt down
    return " · ".join([f"**{plain_text(lines[0])}**"] + [plain_text(line[2:]) for line in lines[1:]])


def settings_summary(intactkv="off", calibrated=False, calibration=EVALUATED, upload=None,
                     ctx=0, samples=0, sequential=True) -> str:
    """The folded settings' header: what they are now, e.g. "IntactKV off · calibration: prompts
    in use · chunk 0"."""
    ikv = (str(intactkv or "off").strip() or "off") + (" +Cal" if calibrated else "")
    path = upload_path(upload)
    source = Path(path).name if path else (calibration or EVALUATED)
    parts = [f"IntactKV {ikv}", f"calibration: {source}", f"chunk {int(ctx or 0)}"]
    if int(samples or 0):
        parts.append(f"first {int(samples)} samples")
    if not sequential:
        parts.append("not sequential")
    return "Settings: " + " · ".join(parts)


def settings_header(*values):
    """The accordion's header after a folded setting changed."""
    return gr.update(label=settings_summary(*values))


def format_help() -> str:
    """The Custom spec box's help: the deployed formats' spec forms (from the registry)."""
    from dtm_core.compression.methods import METHODS
    from dtm_core.compression.methods.formats import FormatMethod

    forms = [f for cls in METHODS.values() if issubclass(cls, FormatMethod) for f in cls.forms]
    return "e.g. int4:g64:asym; formats: " + ", ".join(forms)


def component_help(source):
    """The Components box's help line for the dense model's family (from its config only)."""
    from dtm_core.models.families import family_for_type, kinds_help
    from dtm_core.models.load import model_type_of

    # (an updated info is shown as text; only the constructor's is read as Markdown)
    return gr.update(info=kinds_help(family_for_type(model_type_of((source or "default")
                                                                    .strip()))))


def upload_path(upload) -> str | None:
    if upload is None:
        return None
    return upload if isinstance(upload, str) else getattr(upload, "name", None)


def calibration_setting(choice, upload=None, ctx=None, samples=None) -> CalibrationSetting:
    """The page's calibration choice: an uploaded file wins over the dropdown; ``ctx`` and
    ``samples`` (0 or empty: off) cut it into chunks / keep the first ones."""
    path = upload_path(upload)
    ctx, samples = (int(v) if v else None for v in (ctx, samples))
    if path:
        return CalibrationSetting(path, ctx, samples)
    return CalibrationSetting.of(None if (choice or EVALUATED) == EVALUATED else choice, ctx,
                                 samples)


def pair_request(model, preset, spec, components, checkpoint, chat=False, calibration=None,
                 calibration_file=None, calib_ctx=None, calib_samples=None,
                 sequential=True) -> PairRequest:
    """The pair the form describes, validated before any model work. ``sequential``: the
    page's box; ticked (its default) leaves each method its own default (layer by layer for
    GPTQ, SparseGPT, Wanda and AWQ), unticked calibrates every layer on dense inputs."""
    source = (model or "default").strip()
    setting = calibration_setting(calibration, calibration_file, calib_ctx, calib_samples)
    if preset == CHECKPOINT:
        if not (checkpoint or "").strip():
            raise DTMError("Give the path or hub id of the second checkpoint.")
        return PairRequest(model=source, compressed_model=checkpoint.strip())
    text = (spec or "").strip() if preset == CUSTOM else preset
    if not text:
        raise DTMError("Give a compression spec, e.g. int4:g128.")
    req = PairRequest(model=source, compress=str(parse_spec(text)),
                      components=(components or "").strip() or "*.*", calibration=setting,
                      chat=bool(chat),
                      sequential=None if sequential is None or sequential else False)
    req.validate()
    return req


def intactkv_setting(pivots, calibrated=False, steps=50) -> IntactKVSetting:
    setting = IntactKVSetting(pivots=pivots, calibrated=bool(calibrated), steps=int(steps or 50))
    setting.parse()   # a bad setting is a message before any model work
    return setting


def calib_progress(progress):
    """Gradio's progress bar for a pivot-KV calibration."""
    if progress is None:
        return None
    return lambda f, m: progress(f, desc=f"calibrating pivot KV: {m}")


class Stops:
    """Stop signals per browser session and job kind; each is removed when its job ends."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(job: str, request) -> str:
        return f"{job}:{getattr(request, 'session_hash', '') or ''}"

    @contextmanager
    def running(self, job: str, request):
        """The stop signal of a job while it runs (a generator handler holds it across yields)."""
        key, ev = self._key(job, request), threading.Event()
        with self._lock:
            self._events[key] = ev
        try:
            yield ev
        finally:
            with self._lock:
                if self._events.get(key) is ev:
                    del self._events[key]

    def stopper(self, job: str, message: str):
        """The handler of a Stop button: signals the session's running job of that kind."""
        def stop(request: gr.Request):
            with self._lock:
                ev = self._events.get(self._key(job, request))
            if ev is not None:
                ev.set()
            return message
        return stop

    def __len__(self) -> int:
        return len(self._events)


STOPS = Stops()
FIRST = " For the first prompt: "  # lead of the pivot note of a prompt set


def pivot_note(tokenizer, ikv, text: str, chat, lead: str = " ") -> str:
    """Which tokens the pivots of ``text`` are (it matters for tokenizers without BOS), after
    ``lead``; empty when IntactKV is off."""
    if ikv is None:
        return ""
    ids = encode_prompts(tokenizer, [text], chat=bool(chat))[0]
    note = describe_pivots(tokenizer, ids, ikv.pivot_lengths(tokenizer, [ids])[0])
    return lead + note + (" (calibrated)" if ikv.calibrated is not None else "")


def example_file(builtin: str, count: int) -> str:
    """A prompt file of the first ``count`` items of a built-in set (answers and all), for the
    tabs' Example buttons: the upload box then shows exactly what runs."""
    import tempfile

    from dtm_core.measure.prompts import ASSETS

    lines = (ASSETS / f"{builtin}.jsonl").read_text(encoding="utf-8").splitlines()
    folder = Path(tempfile.mkdtemp(prefix="dtm-example-"))
    path = folder / f"{builtin}-first{count}.jsonl"
    path.write_text("\n".join([ln for ln in lines if ln.strip()][:count]) + "\n",
                    encoding="utf-8")
    return str(path)


def load_set(upload, builtin):
    """The prompt set a tab describes: an uploaded file wins over the built-in choice."""
    path = upload_path(upload)
    if path:
        with open(path, "rb") as fh:
            data = fh.read(10 * 1024 * 1024 + 1)
        return parse_prompt_bytes(data, os.path.basename(path))
    if not builtin:
        raise DTMError("Upload a prompt file or pick a built-in set.")
    return load_prompts(builtin)
