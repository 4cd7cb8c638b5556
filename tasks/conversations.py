"""Chat data through Hugging Face `datasets`: SFT conversations and preference pairs from local files or the Hub.

A source is a local JSON, JSONL or Parquet file (gzipped too; Alpaca's JSON array file as well), a Hub dataset
name or a folder laid out like one (a downloaded snapshot), loaded with `datasets.load_dataset` (its cache lives in the workspace, `infra.env`). Small adapters map its
records to conversations, lists of `{"role", "content"}` messages:

- SFT: Alpaca (`instruction`/`input`/`output`), OpenAssistant trees (`prompt` -> `replies`, or the flat export of
  one row per message; the best-ranked path or every path), ShareGPT (`conversations` of `from`/`value`),
  `messages` lists (`role`/`content`).
- Preferences, as (prompt messages, chosen reply, rejected reply): HH-RLHF (`chosen`/`rejected` dialogue strings),
  ShareGPT pairs (`conversations` + `chosen`/`rejected` turns), `chosen`/`rejected` message lists (TRL's layout),
  OpenAssistant sibling replies ranked by people.

The layout is found from the columns or given by `format`. A conversation the model cannot learn from is counted by
reason (`dropped/no_assistant_turn`, ...), never silently dropped; a file in no known layout, a missing or
unreadable file, or a malformed record is a one-line `GptflowError` naming the file and the record or field.
`load_mixture` samples several sources by weight and reports the realised shares (`mix/<source>_share`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from infra.env import resolve_path, setup_env
from infra.jsonl import JsonlError, check_utf8
from tasks.stage import GptflowError

if TYPE_CHECKING:
    import datasets

Message = dict[str, str]
Pair = tuple[list[Message], str, str]
ROLES = ("system", "user", "assistant")
OASST_FLAT = {"message_id", "parent_id", "role", "text"}  # OpenAssistant's flat export: one row per message
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
# ShareGPT speaker names seen in the wild (LLaMA-Factory, FastChat); anything else (tool calls, observations) is
# an unknown role, counted, because our template has no token for it.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record that does not have the layout's fields; the loader names the file and the record."""


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="A local JSON/JSONL/Parquet file (.gz or .bz2 too; repo-relative or absolute), a folder laid out like a Hub dataset, or a Hugging Face Hub dataset name (needs the network: HF_HUB_OFFLINE=0).")
    weight: float = Field(1.0, gt=0, description="Share of the mixture, relative to the other sources' weights.")
    max_records: int | None = Field(None, ge=1, description="Read at most this many records from the top of the source (None: all).")
    split: str = Field("train", description="The split to read from a Hub dataset (a local file is one 'train' split).")

    @property
    def label(self) -> str:
        """A short name for counts and metrics: the file name without its suffixes, or the Hub name."""
        name = Path(self.path).name if _is_file_like(self.path) else self.path
        for suffix in (".gz", ".bz2", *FILE_SUFFIXES):
            name = name.removesuffix(suffix)
        return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class SFTSource(_Source):
    format: Literal["auto", "alpaca", "oasst", "sharegpt", "messages"] = Field("auto", description="Record layout; 'auto' finds it from the columns.")
    oasst_paths: Literal["best", "all"] = Field("best", description="OpenAssistant trees: follow the best-ranked reply at each turn (one conversation per tree), or every root-to-leaf path.")


class PreferenceSource(_Source):
    format: Literal["auto", "hh", "sharegpt", "messages", "oasst"] = Field("auto", description="Record layout; 'auto' finds it from the columns.")


def _paths_as_sources(value: Any) -> Any:
    """`sources="x.jsonl"` or `["a.json", "b.jsonl"]` in a config: each path a source of weight 1."""
    if isinstance(value, str | Path):
        value = [value]
    return [{"path": str(v)} if isinstance(v, str | Path) else v for v in value]


# A stage config's `sources` field: sources, or paths standing for sources of weight 1.
SFTSources = Annotated[tuple[SFTSource, ...], BeforeValidator(_paths_as_sources)]
PreferenceSources = Annotated[tuple[PreferenceSource, ...], BeforeValidator(_paths_as_sources)]


# ---- loading -------------------------------------------------------------------------------------------------


def _is_file_like(path: str) -> bool:
    name = path.removesuffix(".gz").removesuffix(".bz2")
    return name.endswith(FILE_SUFFIXES) or Path(path).is_absolute() or path.startswith(".")


def load_records(path: str, split: str = "train", max_records: int | None = None) -> datasets.Dataset:
    """The records of a local file or a Hub dataset, as a `datasets.Dataset`; every failure is one line."""
    setup_env()  # the datasets cache in the workspace and the offline switches, before `datasets` is imported
    import datasets

    datasets.disable_progress_bars()
    local = resolve_path(path)
    if local.is_file():
        ds = _load_file(local)
    elif _is_file_like(path) and not local.exists():
        raise GptflowError(f"chat data file does not exist: {local}")
    else:  # a Hub name, or a folder laid out like a Hub dataset; `train[:N]` is datasets' split slicing
        name = str(local) if local.is_dir() else path
        return _load_named(name, f"{split}[:{max_records}]" if max_records else split)
    if len(ds) == 0:
        raise GptflowError(f"{path}: no records")
    return ds.select(range(min(max_records, len(ds)))) if max_records else ds


def _load_file(path: Path) -> datasets.Dataset:
    import datasets

    name = path.name.removesuffix(".gz").removesuffix(".bz2")
    builder = "parquet" if name.endswith(".parquet") else "json" if name.endswith((".json", ".jsonl")) else None
    if builder is None:
        raise GptflowError(f"{path}: not a .json, .jsonl or .parquet file (optionally .gz or .bz2)")
    if builder == "json":  # pyarrow keeps invalid UTF-8 and fails later, on some record, naming no file
        try:
            check_utf8(path)
        except JsonlError as e:
            raise GptflowError(str(e)) from None
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except StopIteration as e:  # the json builder's way of saying the file holds nothing
        raise GptflowError(f"{path}: no records") from e
    except Exception as e:  # datasets wraps the parser's error; the cause says what and where
        cause = e.__cause__ or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise GptflowError(f"{path}: not readable as {builder.upper()} ({first})") from e


def _load_named(name: str, split: str) -> datasets.Dataset:
    """A Hub dataset, or a local folder in a Hub dataset's layout (a downloaded snapshot: data files by split)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if Path(name).is_dir():
            raise GptflowError(f"{name}: a folder that datasets cannot read as a dataset ({first})") from e
        hint = " Hugging Face Hub access is off (HF_HUB_OFFLINE=1): set HF_HUB_OFFLINE=0 and HF_DATASETS_OFFLINE=0 to download, or give a local file." if datasets.config.HF_HUB_OFFLINE else ""
        raise GptflowError(f"{name}: not a local file, and not loadable from the Hub ({first}).{hint}") from e
    if len(ds) == 0:
        raise GptflowError(f"{name}: no records in split '{split}'")
    return ds


def _records(rows: list[dict], columns: list[str], fmt: str, counts: Counter[str]) -> Iterator[tuple[int, dict]]:
    """The records; OpenAssistant's flat export (one row per message) first assembled into trees."""
    if fmt == "oasst" and "prompt" not in columns and OASST_FLAT <= set(columns):
        rows = _oasst_trees(rows, counts)
    yield from enumerate(rows)


def _oasst_trees(rows: list[dict], counts: Counter[str]) -> list[dict]:
    """The trees of OpenAssistant's flat export (the Hub's OpenAssistant/oasst1 and oasst2: `message_id`,
    `parent_id`, ...) in the tree export's layout, `{"prompt": root}`. A message whose parent is not among the
    rows (cut off by `max_records`) is counted as `dropped/orphan_message`, and so are its replies."""
    nodes = {r["message_id"]: {**r, "replies": []} for r in rows}
    roots, orphans = [], []
    for node in nodes.values():
        parent = nodes.get(node["parent_id"]) if node["parent_id"] else None
        if node["parent_id"] and parent is None:
            orphans.append(node)
        else:
            (parent["replies"] if parent else roots).append(node)
    if orphans:
        counts["dropped/orphan_message"] += sum(_tree_size(n) for n in orphans)
    return [{"prompt": root} for root in roots]


def _tree_size(node: dict) -> int:
    return 1 + sum(_tree_size(r) for r in node.get("replies") or [])


# ---- SFT adapters --------------------------------------------------------------------------------------------


def _field(r: dict, name: str, kind: type = str) -> Any:
    value = r.get(name)
    if not isinstance(value, kind):
        raise RecordError(f"field '{name}' is {type(value).__name__}, not {kind.__name__}")
    return value


def _system(r: dict) -> list[Message]:
    """A `system` column (LLaMA-Factory's Alpaca and ShareGPT layouts) as the opening system turn."""
    return [{"role": "system", "content": r["system"]}] if isinstance(r.get("system"), str) and r["system"] else []


def _alpaca(r: dict) -> Iterator[list[Message]]:
    """instruction (+ input) -> output, after the optional `system` and `history` ([[question, answer], ...])."""
    prompt = _field(r, "instruction") + (f"\n\n{r['input']}" if r.get("input") else "")
    history = r.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise RecordError("field 'history' is not a list of [question, answer] pairs")
    earlier = [{"role": role, "content": text} for q, a in history for role, text in (("user", q), ("assistant", a))]
    yield _system(r) + earlier + [{"role": "user", "content": prompt}, {"role": "assistant", "content": r.get("output") or ""}]


def _turns(turns: Any, field: str, role_key: str, text_key: str, roles: dict[str, str] | None) -> list[Message]:
    if not isinstance(turns, list):
        raise RecordError(f"field '{field}' is {type(turns).__name__}, not a list")
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get(role_key), str) or not isinstance(t.get(text_key), str):
            raise RecordError(f"{field}[{j}] has no string '{role_key}' and '{text_key}'")
        role = roles.get(t[role_key], t[role_key]) if roles else t[role_key]
        out.append({"role": role, "content": t[text_key]})
    return out


def _sharegpt(r: dict) -> Iterator[list[Message]]:
    yield _system(r) + _turns(r.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)


def _messages(r: dict) -> Iterator[list[Message]]:
    yield _turns(r.get("messages"), "messages", "role", "content", None)


def _oasst_node(node: Any) -> tuple[Message, list[dict]]:
    if not isinstance(node, dict) or not isinstance(node.get("text"), str) or node.get("role") not in ("prompter", "assistant"):
        raise RecordError("an OpenAssistant message has no 'text' or a 'role' other than prompter/assistant")
    role = "user" if node["role"] == "prompter" else "assistant"
    return {"role": role, "content": node["text"]}, _by_rank(node.get("replies") or [])


def _by_rank(replies: list[dict]) -> list[dict]:
    """Replies best first (rank 0 is the best); unranked replies last, in file order."""
    return sorted(replies, key=lambda n: (n.get("rank") is None, n.get("rank") or 0))


def _oasst_paths(node: dict, prefix: list[Message], every: bool) -> Iterator[list[Message]]:
    """The conversations of an OpenAssistant tree: each root-to-leaf path, or only the best-ranked one."""
    message, replies = _oasst_node(node)
    convo = prefix + [message]
    if not replies:
        yield convo
    for reply in replies if every else replies[:1]:
        yield from _oasst_paths(reply, convo, every)


def _oasst_kept(node: dict, drops: list[str]) -> dict | None:
    """The tree without messages marked deleted or rejected by review (`review_result` false), as OpenAssistant's
    own training data leaves them out; each one cut, with its replies, adds a drop reason."""
    if node.get("deleted") or node.get("review_result") is False:
        drops += ["oasst_deleted_or_rejected"] * _tree_size(node)
        return None
    replies = [kept for r in node.get("replies") or [] if (kept := _oasst_kept(r, drops)) is not None]
    return {**node, "replies": replies}


def _oasst(every: bool):
    def adapt(r: dict) -> Iterator[list[Message] | str]:
        drops: list[str] = []
        root = _oasst_kept(_field(r, "prompt", dict), drops)
        yield from drops
        if root is not None:
            yield from _oasst_paths(root, [], every)
    return adapt


def _sft_format(columns: list[str], first: dict, path: str) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if ("prompt" in cols and isinstance(first.get("prompt"), dict)) or OASST_FLAT <= cols:
        return "oasst"
    raise GptflowError(f"{path}: record 0 has fields {sorted(cols)}: none of the SFT layouts (Alpaca instruction/output, "
                       "OpenAssistant prompt tree, ShareGPT conversations, messages)")


def check_conversation(convo: list[Message]) -> tuple[list[Message], str | None, bool]:
    """(the conversation cut after its last assistant turn, the drop reason or None, whether turns were cut)."""
    if any(m["role"] not in ROLES for m in convo):
        return convo, "unknown_role", False
    last = max((i for i, m in enumerate(convo) if m["role"] == "assistant"), default=None)
    if last is None:
        return convo, "no_assistant_turn", False
    if any(m["role"] == "assistant" and not m["content"].strip() for m in convo):
        return convo, "empty_assistant", False
    return convo[: last + 1], None, last + 1 < len(convo)


def load_sft(source: SFTSource) -> tuple[list[list[Message]], dict[str, int]]:
    """The usable conversations of one source, and its counts: records, conversations, kept, dropped/<reason>,
    trimmed/trailing_turns (conversations that ended with user turns, which teach nothing, cut after the last
    assistant turn)."""
    ds = load_records(source.path, source.split, source.max_records)
    return adapt_sft(ds.to_list(), ds.column_names, source)


def adapt_sft(rows: list[dict], columns: list[str], source: SFTSource) -> tuple[list[list[Message]], dict[str, int]]:
    """`load_sft` on records already read (`columns`: their fields, as `datasets` gives them)."""
    fmt = _sft_format(columns, rows[0], source.path) if source.format == "auto" else source.format
    adapt = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages,
             "oasst": _oasst(source.oasst_paths == "all")}[fmt]
    counts: Counter[str] = Counter(records=len(rows))
    out = []
    for i, r in _records(rows, columns, fmt, counts):
        try:
            convos = list(adapt(r))
        except RecordError as e:
            raise GptflowError(f"{source.path}: record {i} ({fmt}): {e}") from e
        for convo in convos:
            if isinstance(convo, str):  # a message the adapter left out, by reason
                counts[f"dropped/{convo}"] += 1
                continue
            counts["conversations"] += 1
            convo, reason, trimmed = check_conversation(convo)
            if reason:
                counts[f"dropped/{reason}"] += 1
                continue
            if trimmed:
                counts["trimmed/trailing_turns"] += 1
            out.append(convo)
    counts["kept"] = len(out)
    return out, dict(counts)


# ---- preference adapters -------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_messages(text: str) -> list[Message]:
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)[1:]
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[::2], parts[1::2], strict=False)]


def _split_pair(chosen: list[Message], rejected: list[Message]) -> Pair | str:
    """Two whole dialogues that differ in their last reply, as (shared prompt, chosen reply, rejected reply)."""
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        return "no_assistant_reply"  # the dialogue does not end with a reply to compare
    if chosen[:-1] != rejected[:-1]:
        return "prompt_mismatch"
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _hh(r: dict) -> Iterator[Pair | str]:
    yield _split_pair(_hh_messages(_field(r, "chosen")), _hh_messages(_field(r, "rejected")))


def _messages_pair(r: dict) -> Iterator[Pair | str]:
    """TRL's conversational layout (UltraFeedback and others): `chosen` and `rejected` message lists, whole
    dialogues or only the replies after an optional `prompt` (a string or a message list)."""
    prompt = r.get("prompt")
    prefix = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
              else _turns(prompt, "prompt", "role", "content", None) if prompt is not None else [])
    yield _split_pair(prefix + _turns(r.get("chosen"), "chosen", "role", "content", None),
                      prefix + _turns(r.get("rejected"), "rejected", "role", "content", None))


def _reply(r: dict, name: str) -> str:
    value = r.get(name)
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        return value["value"]
    if isinstance(value, str):
        return value
    raise RecordError(f"field '{name}' is neither a {{from, value}} turn nor a string")


def _sharegpt_pair(r: dict) -> Iterator[Pair | str]:
    prompt = _system(r) + _turns(r.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    yield prompt, _reply(r, "chosen"), _reply(r, "rejected")


def _oasst_pairs(node: dict, prefix: list[Message]) -> Iterator[Pair | str]:
    """At each prompter turn with two or more ranked replies: every (better, worse) pair of them. Unranked
    replies among such siblings are counted; they cannot be ordered."""
    message, replies = _oasst_node(node)
    convo = prefix + [message]
    ranked = [n for n in replies if n.get("rank") is not None]
    if message["role"] == "user" and len(replies) >= 2:
        yield from ["unranked_reply"] * (len(replies) - len(ranked))
        texts = [_oasst_node(n)[0]["content"] for n in ranked]
        yield from ((convo, texts[a], texts[b]) for a in range(len(texts)) for b in range(a + 1, len(texts)))
    for reply in replies:
        yield from _oasst_pairs(reply, convo)


def _oasst_pref(r: dict) -> Iterator[Pair | str]:
    drops: list[str] = []
    root = _oasst_kept(_field(r, "prompt", dict), drops)
    items = drops + (list(_oasst_pairs(root, [])) if root is not None else [])
    yield from items if any(isinstance(x, tuple) for x in items) else [*items, "no_ranked_siblings"]


def _pref_format(columns: list[str], first: dict, path: str) -> str:
    cols = set(columns)
    if {"conversations", "chosen", "rejected"} <= cols:
        return "sharegpt"
    if {"chosen", "rejected"} <= cols and isinstance(first.get("chosen"), str):
        return "hh"
    if {"chosen", "rejected"} <= cols and isinstance(first.get("chosen"), list):
        return "messages"
    if ("prompt" in cols and isinstance(first.get("prompt"), dict)) or OASST_FLAT <= cols:
        return "oasst"
    raise GptflowError(f"{path}: record 0 has fields {sorted(cols)}: none of the preference layouts (HH-RLHF "
                       "chosen/rejected dialogues, ShareGPT conversations + chosen/rejected, chosen/rejected message "
                       "lists, OpenAssistant prompt tree)")


def check_pair(pair: Pair) -> str | None:
    """The reason a preference pair cannot be trained on, or None."""
    prompt, chosen, rejected = pair
    if any(m["role"] not in ROLES for m in prompt):
        return "unknown_role"
    if not prompt or prompt[-1]["role"] != "user":
        return "prompt_not_ending_with_user"
    if not chosen.strip() or not rejected.strip():
        return "empty_reply"
    return "identical_replies" if chosen == rejected else None


def load_pairs(source: PreferenceSource) -> tuple[list[Pair], dict[str, int]]:
    """The usable preference pairs of one source, and its counts: records, pairs (built from the records), kept,
    dropped/<reason> (of a record, a pair or an OpenAssistant reply)."""
    ds = load_records(source.path, source.split, source.max_records)
    return adapt_pairs(ds.to_list(), ds.column_names, source)


def adapt_pairs(rows: list[dict], columns: list[str], source: PreferenceSource) -> tuple[list[Pair], dict[str, int]]:
    """`load_pairs` on records already read (`columns`: their fields, as `datasets` gives them)."""
    fmt = _pref_format(columns, rows[0], source.path) if source.format == "auto" else source.format
    adapt = {"hh": _hh, "sharegpt": _sharegpt_pair, "messages": _messages_pair, "oasst": _oasst_pref}[fmt]
    counts: Counter[str] = Counter(records=len(rows))
    out = []
    for i, r in _records(rows, columns, fmt, counts):
        try:
            items = list(adapt(r))
        except RecordError as e:
            raise GptflowError(f"{source.path}: record {i} ({fmt}): {e}") from e
        for item in items:
            if isinstance(item, tuple):
                counts["pairs"] += 1
            reason = check_pair(item) if isinstance(item, tuple) else item
            if reason:
                counts[f"dropped/{reason}"] += 1
            else:
                out.append(item)
    counts["kept"] = len(out)
    return out, dict(counts)


# ---- mixtures ------------------------------------------------------------------------------------------------


def allocate(available: list[int], weights: list[float], n: int) -> list[int]:
    """How many items to take from each source: `n` split by weight (largest remainder), a source's shortfall
    given to the others by their weights, never more than a source has."""
    take = [0] * len(available)
    while (left := min(n, sum(available)) - sum(take)) > 0:
        open_ = [i for i in range(len(available)) if take[i] < available[i]]
        total = sum(weights[i] for i in open_)
        quota = {i: left * weights[i] / total for i in open_}
        give = {i: min(int(quota[i]), available[i] - take[i]) for i in open_}
        if not any(give.values()):  # fewer items left than sources: one to the largest remainder
            give = {max(open_, key=lambda i: quota[i]): 1}
        for i, k in give.items():
            take[i] += k
    return take


def _mix(items: list[list], labels: list[str], weights: list[float], n: int, seed: int) -> tuple[list, dict]:
    """`allocate`'s share of each source, a sample seeded by `seed` and the source's label (so that a source's
    sample does not depend on the sources before it), all shuffled together."""
    take = allocate([len(x) for x in items], weights, n)
    out, counts = [], {}
    for label, xs, w, k in zip(labels, items, weights, take, strict=True):
        out += [xs[j] for j in sorted(random.Random(f"{seed}/{label}").sample(range(len(xs)), k))]
        counts[f"mix/{label}_weight"] = w / sum(weights)
        counts[f"mix/{label}_selected"] = k
    random.Random(seed).shuffle(out)
    for label, k in zip(labels, take, strict=True):
        counts[f"mix/{label}_share"] = k / max(len(out), 1)
    counts["selected"] = len(out)
    return out, counts


def _labels(sources: list[_Source]) -> list[str]:
    seen: Counter[str] = Counter()
    labels = []
    for s in sources:
        seen[s.label] += 1
        labels.append(s.label if seen[s.label] == 1 else f"{s.label}_{seen[s.label]}")
    return labels


def _merge(per_source: list[dict[str, int]], labels: list[str]) -> dict[str, float]:
    """Totals over the sources (`dropped/<reason>`, `records`, ...) and each source's own (`source/<label>/...`)."""
    totals: Counter[str] = Counter()
    out: dict[str, float] = {}
    for label, counts in zip(labels, per_source, strict=True):
        totals.update(counts)
        out.update({f"source/{label}/{k}": v for k, v in counts.items()})
    return {**dict(totals), **out}


def load_mixture(sources: list[SFTSource], max_examples: int, seed: int) -> tuple[list[list[Message]], dict[str, float]]:
    """Up to `max_examples` conversations drawn from `sources` by weight, shuffled with `seed`; the counts hold
    each source's loading counts, the totals, and the target and realised shares (`mix/<label>_weight`, `_share`)."""
    if not sources:
        raise GptflowError("no SFT data sources given")
    labels = _labels(sources)
    loaded = [load_sft(s) for s in sources]
    convos, mix = _mix([c for c, _ in loaded], labels, [s.weight for s in sources], max_examples, seed)
    return convos, {**_merge([c for _, c in loaded], labels), **mix}


def load_preference_mixture(sources: list[PreferenceSource], max_pairs: int, seed: int) -> tuple[list[Pair], dict[str, float]]:
    """Up to `max_pairs` preference pairs drawn from `sources` by weight; counts as `load_mixture`'s."""
    if not sources:
        raise GptflowError("no preference data sources given")
    labels = _labels(sources)
    loaded = [load_pairs(s) for s in sources]
    pairs, mix = _mix([p for p, _ in loaded], labels, [s.weight for s in sources], max_pairs, seed)
    return pairs, {**_merge([c for _, c in loaded], labels), **mix}
