"""What the model's own files say about a job spec, before any row is generated: fixed
text (``template``, ``response_template``, the prefix) holding a special token's text, a
response template whose fixed text and slots alone exceed ``gen_length``, a prefix and
template longer than the model's context, a ``kv_budget`` the block cache modes cannot run
in, a cache mode or a sampling setting the model's family cannot honour (a block-causal model runs every cache mode
but ``off`` on its exact block cache, whose blocks must be the model's). Each would fail every row (or every replica start); each problem is one line naming the
spec field. ``validate`` and ``run`` ask before any cluster work (``preflight``), a replica
again when it starts, with the tokenizer it loaded (a model given by URL is only seen
there); torch-free.
"""

from __future__ import annotations

from illada_batch.decoding.params import DEFAULT_KV_BUDGET, SamplingParams
from illada_batch.decoding.special_text import special_problem
from illada_batch.decoding.template import ResponseTemplate
from illada_batch.errors import ParamsError
from illada_batch.job.spec import JobSpec

SAMPLING_DEFAULTS = {f: getattr(SamplingParams(), f) for f in SamplingParams.__dataclass_fields__}
PAGE_TOKENS = 16  # the engine's page size (``Engine(page_size=16)``, the size replicas build)


def fixed_text_problems(spec: JobSpec, tok) -> list[str]:
    """Problems of the spec's fixed text for tokenizer ``tok`` (``encode``, ``special_texts``)."""
    specials = tok.special_texts
    prefix_field = "prefix.text" if spec.prefix.text is not None else f"prefix.file ({spec.prefix.file})"
    texts = [("template", spec.template), (prefix_field, spec.prefix_text())]
    if spec.response_template is not None:
        texts.append(("response_template", spec.response_template))
    problems = [p for field, text in texts if (p := special_problem(field, text, specials))]
    if problems or spec.response_template is None:
        return problems
    try:
        parsed = ResponseTemplate.parse(spec.response_template)
    except ParamsError:
        return problems  # the spec refused it already
    least = parsed.render({c: "" for c in parsed.columns}).tokenize(tok.encode)
    if least.length > spec.sampling.gen_length:
        fixed = sum(map(len, least.fixed))
        problems.append(f"response_template: its fixed text is {fixed} tokens and its slots {sum(least.slots)}: "
                        f"{least.length} > sampling.gen_length {spec.sampling.gen_length}, so every row would be "
                        f"an error")
    return problems


def context_problems(spec: JobSpec, tok, max_sequence_length: int) -> list[str]:
    """The prefix, the template's fixed text and ``gen_length`` alone longer than the model's context."""
    fixed = spec.template.format_map({c: "" for c in spec.template_columns() | {"prompt"}}) \
        if not spec.input.messages_column else ""
    least = len(tok.encode(spec.prefix_text())) + len(tok.encode(fixed)) + spec.sampling.gen_length
    if least > max_sequence_length:
        return [f"sampling.gen_length: the prefix and template alone with gen_length {spec.sampling.gen_length} "
                f"are {least} tokens > the model's {max_sequence_length}, so every row would be an error"]
    return []


def kv_budget_problems(spec: JobSpec, page_bytes: int, card) -> list[str]:
    """A budget in bytes too small for one row of the model's longest sequence where each row's
    K/V live in pages: a block cache mode, or any mode but ``off`` of a block-causal model
    (whose rows also hold the block their prompt ends in and one more: ``card.longest_row``).
    A fraction of device memory is only known on the device."""
    budget = spec.engine.budget()
    if budget is None and not spec.resources.num_gpus:
        budget = DEFAULT_KV_BUDGET["cpu"]
    mode = spec.engine.cache.resolve(card)
    rows_in_pages = mode.block_cache or (mode.value != "off" and card.attention.value == "block-causal")
    if not rows_in_pages or not isinstance(budget, int):
        return []
    tokens = card.longest_row(spec.sampling.gen_length, spec.sampling.block_length)
    need = -(-tokens // PAGE_TOKENS)
    if budget // page_bytes < need:
        return [f"engine.kv_budget: {budget:,} bytes hold {budget // page_bytes} pages of {PAGE_TOKENS} tokens; cache "
                f"'{spec.engine.cache.describe(card)}' needs {need} ({need * page_bytes:,} bytes) for one row of the "
                f"model's longest sequence ({tokens} tokens)"]
    return []


def tp_problems(spec: JobSpec, problem: str | None) -> list[str]:
    """``engine.tensor_parallel_size`` against the model (``problem``: ``family.tp_problem``'s
    line for it), and against a backend that does not split models."""
    n = spec.engine.tensor_parallel_size
    if n > 1 and spec.backend != "diffusion":
        return [f"engine.tensor_parallel_size: {n} ranks need backend 'diffusion' (backend '{spec.backend}' "
                f"runs one device per replica here)"]
    return [f"engine.tensor_parallel_size: {problem}"] if problem else []


def family_problems(spec: JobSpec, card, owners: dict[str, str]) -> list[str]:
    """What the model's family card refuses: a ``block_length`` other than the block its
    attention declares (block-causal models; every cache mode runs: ``off``, or the exact
    block cache), ``prefill_chunk`` on a model without block-causal attention (it would do
    nothing), and a sampling setting that only another family honours (``owners``:
    setting -> family)."""
    problems = []
    block = card.attention_block
    if card.attention.value == "block-causal" and block and spec.sampling.block_length != block:
        problems.append(f"sampling.block_length: {spec.sampling.block_length}, but {card.family} attends in blocks "
                        f"of {block} (its config), and the sampler's blocks must be the attention's")
    if card.attention.value == "block-causal" and spec.engine.cache.value != "off" and spec.sampling.cfg_scale > 0:
        problems.append(f"sampling.cfg_scale: {card.family}'s block cache (engine.cache '{spec.engine.cache.value}') "
                        f"keeps no unconditional K/V: set engine.cache: off, or cfg_scale: 0")
    if card.attention.value != "block-causal" and spec.engine.prefill_chunk is not None:
        problems.append(f"engine.prefill_chunk: chunked prefill is for block-causal models, whose prompt is prefilled "
                        f"once into pages; {card.family} attends bidirectionally and has no prefill to chunk "
                        f"(leave it unset)")
    for name, owner in sorted(owners.items()):
        if owner != card.family and getattr(spec.sampling, name, None) not in (None, SAMPLING_DEFAULTS.get(name)):
            problems.append(f"sampling.{name}: a setting of the {owner} family's sampler; this model is "
                            f"{card.family}")
    return problems
