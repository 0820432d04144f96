"""Job specs: pydantic models of ``jobs/<name>.yaml``. Unknown keys are refused, and every
error names the YAML path of the bad field (``sampling.gen_length``), before any cluster
work starts. Each field's comment says its trade-off.
"""

from __future__ import annotations

import datetime as _dt
import re
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from illada_batch.decoding import params as params_mod
from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.decoding.template import ResponseTemplate
from illada_batch.errors import VLLM_INSTALL, ParamsError, SpecError
from illada_batch.job.fingerprint import fingerprint_of


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    path: str = "tiny-llada"  # a shipped model name, a local directory, or an fsspec URL copied once to each node
    sha256: str | None = None  # checksum of the weights (sha256 over the sorted *.safetensors files); checked after copy
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (fp16 is never used: slow on CPU)
    storage_options: dict = Field(default_factory=dict)  # fsspec options for a remote model URL


class InputSpec(_Strict):
    # a file, directory or glob of Parquet, JSON Lines (.jsonl/.json) or CSV files; any fsspec URL
    # (s3://bucket/prefix/*.parquet). Parquet plans from footers; text files are parsed at planning
    url: str
    id_column: str = "id"  # a stable row id (strings or integers): the output key is (id, sample_index)
    prompt_column: str | None = "prompt"  # the row's text, rendered into `template`
    messages_column: str | None = None  # or a chat `messages` column (list of {role, content}); implies chat
    variables: list[str] = Field(default_factory=list)  # more columns usable in `template` as {name}
    passthrough: list[str] = Field(default_factory=list)  # columns copied unchanged to the output
    storage_options: dict = Field(default_factory=dict)  # fsspec options (endpoint_url, key, secret, anon ...)
    # the driver reads the id column of every file before starting, so an id repeated in another shard
    # becomes an error row (generated once); turn off for inputs whose ids are known unique and too big to scan
    check_duplicate_ids: bool = True

    def text_column(self) -> str | None:
        """The column that must hold text (``prompt_column``; a messages column is checked per row)."""
        return None if self.messages_column else self.prompt_column

    def columns(self) -> list[str]:
        """The input columns a job reads, in order, without repeats."""
        return list(dict.fromkeys([self.id_column, self.messages_column or self.prompt_column, *self.variables,
                                   *self.passthrough]))

    @model_validator(mode="after")
    def _one_source(self) -> "InputSpec":
        if not self.prompt_column and not self.messages_column:
            raise ValueError("set prompt_column or messages_column")
        return self


class PrefixSpec(_Strict):
    text: str | None = None  # the shared prefix (system prompt, few-shot examples), encoded once per replica
    file: str | None = None  # or a file holding it (relative to the spec file, or any fsspec URL)

    @model_validator(mode="after")
    def _not_both(self) -> "PrefixSpec":
        if self.text is not None and self.file is not None:
            raise ValueError("give prefix.text or prefix.file, not both")
        return self


def _sampling_fields() -> dict:
    """``SamplingParams``' user settings as pydantic fields: same names, types, defaults, bounds."""
    hints = typing.get_type_hints(SamplingParams)
    out = {}
    for f in params_mod.settings():
        bounds = {k: f.metadata[k] for k in ("gt", "ge", "le") if k in f.metadata}
        out[f.name] = (hints[f.name], Field(f.default, description=f.metadata["help"], **bounds))
    return out


class _SamplingBase(_Strict):
    def params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())

    @model_validator(mode="after")
    def _fits_together(self) -> "_SamplingBase":
        try:
            self.params()
        except ParamsError as exc:
            raise ValueError(str(exc)) from None
        return self


# `sampling:` in a job spec: every field, default, bound and help text comes from SamplingParams.
SamplingSpec = create_model("SamplingSpec", __base__=_SamplingBase, **_sampling_fields())


class EngineSpec(_Strict):
    # prefix: the shared prefix's K/V computed once (4x+ faster at 400-token prefixes); blocks: each row's K/V
    # cached, refreshed per block (long generations; the prefix in each row's context, as LLaDA was trained);
    # prefix+blocks: both (fastest; the prefix attends only to itself, an approximation for LLaDA 1.x);
    # off: every step runs the whole sequence (the reference). A block-causal model (LLaDA 2.x) runs its exact
    # block cache in every mode but off (same tokens as off, system-prompt pages shared). auto (the default):
    # resolved from the model's family card, the exact block cache for block-causal models, prefix otherwise
    cache: CacheMode = CacheMode.AUTO
    max_batch_size: int = Field(16, ge=1)  # rows per forward pass; more = faster until memory or compute saturates
    # the KV pages (prefixes; each row's K/V in the block modes): bytes (an integer, 268435456) or a fraction of
    # the device's free memory (a float, 0.1; 1.0 = all of it); default 10% on GPU, 256 MiB on CPU. More pages
    # keep more prefixes and rows at once: speed only, never the tokens
    kv_budget: int | float | None = None
    # ranks one replica is split over (tensor parallelism: heads, MLP columns and vocabulary split Megatron-style,
    # one device each, placed together on one node). 1: one device per replica (fastest when the model fits one);
    # N: a model N times larger per replica, at the cost of two all-reduces per layer. Must divide the model's
    # heads, KV heads and MLP width (config.json); each rank's kv_budget holds its own KV heads' pages
    tensor_parallel_size: int = Field(1, ge=1)
    # block-causal models (LLaDA 2.x): at most this many prompt tokens prefilled per iteration, over all rows
    # (rounded down to whole blocks, at least one), so a long prompt joining does not stall the rows decoding;
    # unset: a row's whole prefill rides in its first forward (fewer forwards). Speed only, never the tokens
    prefill_chunk: int | None = Field(None, ge=1)

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_off(cls, v):
        return "off" if v is False else v  # YAML reads an unquoted `off` as false

    @field_validator("kv_budget", mode="before")
    @classmethod
    def _kv_budget(cls, v):
        if isinstance(v, bool):
            raise ValueError(f"{str(v).lower()} is no budget: give bytes (an integer, e.g. 268435456) or a fraction "
                             f"of the device's free memory (e.g. 0.1; 1.0 = all of it)")
        if isinstance(v, (int, float)) and v <= 0:
            raise ValueError(f"must be > 0, got {v!r}")
        if isinstance(v, int) and v == 1:
            raise ValueError("1 is ambiguous: write 1.0 for all of the device's free memory, or a number of bytes")
        return v

    def budget(self) -> int | float | None:
        """The KV budget as the engine takes it: bytes (int), a fraction of free memory
        (float), or None (the engine's default for its device)."""
        v = self.kv_budget
        return v if v is None or (isinstance(v, float) and v <= 1) else int(v)


class OutputSpec(_Strict):
    url: str = "out/{job}/{date}"  # where data/, _manifest/ and _SUCCESS.json go; {job} and {date} are filled in
    storage_options: dict = Field(default_factory=dict)


class ResourcesSpec(_Strict):
    num_gpus: float = Field(0, ge=0)  # per replica: 1 on GPU clusters (one model copy per GPU)
    num_cpus: float = Field(1, ge=0)  # per replica; also the torch thread count on CPU


class ReplicaRange(_Strict):
    min: int = Field(1, ge=1)  # replicas the job needs: fewer placed after placement_timeout_s is reported
    max: int = Field(ge=1)  # replicas the driver asks for (never more than there are shards)

    @model_validator(mode="after")
    def _ordered(self) -> "ReplicaRange":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    backend: Literal["diffusion", "vllm"] = "diffusion"  # vllm: an autoregressive HF checkpoint on vLLM (an optional extra)
    model: ModelSpec = Field(default_factory=ModelSpec)
    input: InputSpec
    prefix: PrefixSpec = Field(default_factory=PrefixSpec)
    template: str = "{prompt}"  # the row prompt: str.format over the prompt and `input.variables` columns
    chat: bool = False  # wrap prefix + row prompt in the model's chat template
    # the response's skeleton: fixed text with {slot:N} slots of N tokens, e.g. '{"name": "{slot:8}"}', and
    # {prompt} / `input.variables` columns; only slots are generated (fixed text costs gen_length positions,
    # no steps) and the output gains a `slots` column; None: the whole response is generated
    response_template: str | None = None
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    n: int = Field(1, ge=1)  # samples per row
    seed: int = 0  # job seed: a sample's seed is derived from (seed, row id, sample index)
    output: OutputSpec = Field(default_factory=OutputSpec)
    # model copies; each pulls shards when free. A range ({min: 1, max: 64}, as ray.data.llm's concurrency):
    # the driver asks for up to max; on a cluster that may grow, those beyond min that Ray cannot place yet
    # wait as demand for the autoscaler instead of being given up after placement_timeout_s
    replicas: typing.Union[int, ReplicaRange] = 1
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    shard_rows: int = Field(256, ge=1)  # rows per shard: the unit of retry and commit
    max_retries: int = Field(3, ge=0)  # tries per shard after the first, before it is recorded as failed
    # a failed shard waits this long before its retry, doubling each try (at most 60 s): a store or node
    # that is briefly down gets time to come back instead of the retries being spent at once
    retry_backoff_s: float = Field(2.0, ge=0)
    error_budget: float = Field(0.0, ge=0, le=1)  # fraction of rows allowed to end with an error for exit code 0
    # a replica Ray has not placed within this long is reported (what it asks for, what the cluster has) and
    # given up, its shards left to those that started; none left: the job stops. Long enough for an autoscaler
    # to add a node; short wastes nothing on a fixed cluster (a request no node can hold is refused at once)
    placement_timeout_s: float = Field(600.0, gt=0)
    # with no shard committed for this long the driver says so (replicas working, starting, shards in flight)
    stall_warning_s: float = Field(600.0, gt=0)

    base_dir: str = Field(".", exclude=True)  # where the spec file lives (relative paths resolve against it)

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas_number_or_range(cls, v):
        """One message per mistake (a union's would list each alternative's)."""
        if isinstance(v, ReplicaRange):
            return v
        if isinstance(v, dict):
            try:
                return ReplicaRange.model_validate(v)
            except ValidationError as exc:
                raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'range'}: {e['msg']}"
                                           for e in exc.errors())) from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected a number of replicas or a range {{min: 1, max: 64}}, got {v!r}")
        if v < 1:
            raise ValueError(f"at least 1 replica, got {v}")
        return v

    @property
    def replica_range(self) -> tuple[int, int]:
        """(fewest replicas the job needs, most it asks for)."""
        r = self.replicas
        return (r, r) if isinstance(r, int) else (r.min, r.max)

    @field_validator("backend")
    @classmethod
    def _backend_available(cls, v: str, info: ValidationInfo) -> str:
        # Checked where the job runs (run, validate, the replicas); a spec only rendered or
        # submitted from a machine without vLLM (a laptop) is not refused for it.
        if v == "vllm" and (info.context or {}).get("runs_here", True):
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ValueError(f"backend 'vllm' needs vLLM, which is not installed: {VLLM_INSTALL}")
        return v

    @model_validator(mode="after")
    def _backend_sampling(self) -> "JobSpec":
        # vLLM uses gen_length (max tokens), temperature and suppress_eos; the diffusion-only
        # fields (steps, block_length, remasking, threshold) do not apply to it.
        if self.backend == "vllm" and self.sampling.cfg_scale > 0:
            raise ValueError("sampling.cfg_scale: classifier-free guidance is a diffusion option; "
                             "the vllm backend needs cfg_scale 0")
        if self.backend == "vllm" and self.engine.prefill_chunk is not None:
            raise ValueError("engine.prefill_chunk: the diffusion engine's chunked prefill; vLLM chunks long "
                             "prompts by its own scheduler (leave it unset with backend vllm)")
        if (self.backend == "diffusion" and self.sampling.cfg_scale > 0 and self.engine.cache is not CacheMode.OFF
                and (self.engine.cache.block_cache or self.prefix.text or self.prefix.file)):
            raise ValueError(f"sampling.cfg_scale: classifier-free guidance masks the whole prompt (a shared "
                             f"prefix too), which engine.cache '{self.engine.cache.value}' keeps unmasked: set "
                             f"engine.cache: off, or cfg_scale: 0")
        return self

    @model_validator(mode="after")
    def _response_template_ok(self) -> "JobSpec":
        if self.response_template is None:
            return self
        if self.backend == "vllm":
            raise ValueError("response_template: slots filled in place are a diffusion option; the vllm backend "
                             "generates left to right")
        try:
            parsed = ResponseTemplate.parse(self.response_template)
        except ParamsError as exc:
            raise ValueError(f"response_template: {exc}") from None
        if sum(parsed.slot_sizes) > self.sampling.gen_length:
            raise ValueError(f"response_template: its slots hold {sum(parsed.slot_sizes)} tokens > "
                             f"sampling.gen_length {self.sampling.gen_length}")
        known = (["prompt"] if not self.input.messages_column else []) + list(self.input.variables)
        unknown = [c for c in parsed.columns if c not in known]
        if unknown:
            raise ValueError(f"response_template: {{{unknown[0]}}} is not a row column here (known: "
                             f"{', '.join(known) or 'none'}; add it to input.variables)")
        return self

    @field_validator("template")
    @classmethod
    def _template_ok(cls, v: str) -> str:
        try:
            v.format_map(_AnyKeys())
        except (ValueError, IndexError, AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"not a valid format string: {exc}") from None
        return v

    @model_validator(mode="after")
    def _template_fields(self) -> "JobSpec":
        # a field the row cannot fill would fail every row: refuse it here, naming the choices
        if self.input.messages_column:
            return self  # chat messages are rendered by the chat template, not by `template`
        known = {"prompt", *self.input.variables}
        unknown = sorted(self.template_columns() - known)
        if unknown:
            raise ValueError(f"template: {{{unknown[0]}}} is neither {{prompt}} nor one of input.variables "
                             f"({', '.join(self.input.variables) or 'none'}): add the column to input.variables")
        return self

    # --- derived ---------------------------------------------------------------------

    def template_columns(self) -> set[str]:
        """The row columns ``template`` reads (``{prompt}``, ``{topic}``, ``{topic[0]}`` -> topic)."""
        import string

        return {re.split(r"[.\[]", name, maxsplit=1)[0] for _, name, _, _ in string.Formatter().parse(self.template)
                if name} - {""}

    def output_url(self, date: str | None = None) -> str:
        date = date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
        return self.output.url.format(job=self.name, date=date)

    def resolve(self, path: str) -> str:
        """A path relative to the spec file's folder; URLs and absolute paths unchanged."""
        if "://" in path or Path(path).is_absolute():
            return path
        return str(Path(self.base_dir) / path)

    def resolved(self) -> "JobSpec":
        """A copy whose local paths are absolute, so replicas in other working directories
        (Ray workers) find the same files: input, prefix file, model directory, output."""
        import os

        def local(url: str) -> str:
            return url if "://" in url else os.path.abspath(url)

        model_path = self.resolve(self.model.path)
        return self.model_copy(update={
            "input": self.input.model_copy(update={"url": local(self.resolve(self.input.url))}),
            "prefix": self.prefix.model_copy(update={"file": local(self.resolve(self.prefix.file))})
            if self.prefix.file else self.prefix,
            "model": self.model.model_copy(update={"path": local(model_path)}) if Path(model_path).is_dir() else self.model,
            "output": self.output.model_copy(update={"url": local(self.output.url)}),
        })

    def prefix_text(self) -> str:
        if self.prefix.text is not None:
            return self.prefix.text
        if self.prefix.file is None:
            return ""
        import fsspec

        url = self.resolve(self.prefix.file)
        try:
            with fsspec.open(url, "r", encoding="utf-8", **self.input.storage_options) as f:
                return f.read()
        except FileNotFoundError:
            raise SpecError(f"prefix.file: {url} not found") from None

    def _sampling_identity(self) -> dict:
        """The sampling settings, those added later left out at their default (older outputs
        keep their fingerprint)."""
        dump = self.sampling.model_dump(mode="json")
        defaults = SamplingSpec().model_dump(mode="json")
        return {k: v for k, v in dump.items() if k not in params_mod.LATER_SETTINGS or v != defaults[k]}

    def fingerprint(self) -> str:
        """What makes outputs comparable: every field that can change a token or an output
        column (model, dtype, backend, cache mode, sampling, template, prefix text, seed, n,
        input), that is every field but the ``TOKEN_NEUTRAL`` ones, so a new field is in it
        until someone shows it cannot change a token (``job/fingerprint.py``)."""
        return fingerprint_of(self.model_dump(mode="json"), self._sampling_identity(), self.prefix_text())


class _AnyKeys(dict):
    def __missing__(self, key: str) -> str:
        return ""


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job spec"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        named = re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", msg, re.S)  # a cross-field check naming its field
        if named:
            path, msg = (f"{path}.{named[1]}" if path else named[1]), named[2]
        path = path or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _set_path(raw: dict, dotted: str, value) -> None:
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {dotted}: {k} is not a mapping")
    node[keys[-1]] = value


def load_spec(path: str | Path, overrides: list[str] | None = None, runs_here: bool = True) -> JobSpec:
    """Read and validate a YAML job spec; ``overrides`` are ``key.path=value`` (value parsed as YAML).
    ``runs_here=False``: the job runs elsewhere (submit, render), so the backend's packages
    need not be installed on this machine."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job spec is a YAML mapping, got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--set {item!r}: expected key.path=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SpecError(f"--set {item!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); "
                            f"quote it: --set {key.strip()}='\"...\"'") from None
        _set_path(raw, key.strip(), parsed)
    return spec_from_dict(raw, source=str(path), base_dir=str(path.parent.resolve()), runs_here=runs_here)


def spec_from_dict(raw: dict, source: str = "<spec>", base_dir: str = ".", runs_here: bool = True) -> JobSpec:
    try:
        return JobSpec.model_validate({**raw, "base_dir": base_dir}, context={"runs_here": runs_here})
    except ValidationError as err:
        raise SpecError(_format_error(err, source)) from None
