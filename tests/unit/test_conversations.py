"""Chat data through `datasets`: each adapter on real records, counted drops, one-line errors, weighted mixtures.

Run: `python -m pytest tests/unit/test_conversations.py -q`. The full shared files (../shared/data, or
$GPTFLOW_SHARED_DATA) are used where present; the bundled samples in data/ cover every adapter without them.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from infra.env import DATA_DIR, REPO_ROOT, workspace
from tasks.conversations import (
    PreferenceSource,
    SFTSource,
    allocate,
    load_mixture,
    load_pairs,
    load_preference_mixture,
    load_sft,
)
from tasks.stage import GptflowError

SHARED = Path(os.environ.get("GPTFLOW_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
needs_shared = pytest.mark.skipif(not (SHARED / "sft").is_dir(), reason="shared data (../shared/data) not available")
ALPACA = DATA_DIR / "sft" / "alpaca_en_demo.json.gz"
OASST = DATA_DIR / "sft" / "oasst_en_tree_sample.jsonl.gz"
SHAREGPT = DATA_DIR / "sft" / "sharegpt_chosen_demo.json.gz"
DPO = DATA_DIR / "preference" / "dpo_en_demo.json.gz"
HH = DATA_DIR / "preference" / "hh_rlhf_harmless_sample.jsonl.gz"


def sft(path, **kw):
    return load_sft(SFTSource(path=str(path), **kw))


def pairs(path, **kw):
    return load_pairs(PreferenceSource(path=str(path), **kw))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def roles(convo):
    return [m["role"] for m in convo]


# ---- SFT adapters on real records -----------------------------------------------------------------------------


def test_alpaca_json_array_gz_joins_instruction_and_input():
    convos, counts = sft(ALPACA)
    assert counts == {"records": 999, "conversations": 999, "kept": 999}
    assert all(roles(c) == ["user", "assistant"] for c in convos)
    raw = json.loads(gzip.open(ALPACA, "rt").read())
    i = next(i for i, r in enumerate(raw) if r["input"])
    assert convos[i][0]["content"] == raw[i]["instruction"] + "\n\n" + raw[i]["input"]
    assert convos[i][1]["content"] == raw[i]["output"]


def test_oasst_best_path_vs_every_path():
    best, best_counts = sft(OASST)
    every, every_counts = sft(OASST, oasst_paths="all")
    assert (len(best), len(every)) == (10, 54)  # one per tree; one per leaf of the 10 trees
    # A path that ends on a user turn (19 prompter leaves here) is cut after its last reply, and counted.
    assert best_counts["trimmed/trailing_turns"] == 5 and every_counts["trimmed/trailing_turns"] == 19
    assert all(c[-1]["role"] == "assistant" and roles(c)[::2] == ["user"] * len(c[::2]) for c in every)
    assert all(b in every for b in best)
    first = json.loads(gzip.open(OASST, "rt").readline())["prompt"]
    ranked = sorted((r for r in first["replies"] if r.get("rank") is not None), key=lambda r: r["rank"])
    assert best[0][:2] == [{"role": "user", "content": first["text"]}, {"role": "assistant", "content": ranked[0]["text"]}]


@needs_shared
@pytest.mark.parametrize(("name", "options", "kept"), [
    ("sft/llamafactory_alpaca_en_demo.json.gz", {}, 999),
    ("sft/oasst_en_100_tree.jsonl.gz", {}, 100),
    ("sft/oasst_en_100_tree.jsonl.gz", {"oasst_paths": "all"}, 626),
    ("preference/llamafactory_dpo_en_demo.json.gz", {"format": "sharegpt"}, 106),
])
def test_sft_adapters_on_the_shared_files(name, options, kept):
    convos, counts = sft(SHARED / name, **options)
    assert counts["kept"] == len(convos) == kept
    assert all(c[-1]["role"] == "assistant" and {m["role"] for m in c} <= {"system", "user", "assistant"} for c in convos)


@needs_shared
def test_a_shared_file_in_no_known_layout_is_named():
    """Self-Instruct's seed tasks (`instruction` + `instances`) are none of the layouts: one line says so."""
    with pytest.raises(GptflowError, match=r"stanford_alpaca_seed_tasks\.jsonl: record 0 has fields \['id', 'instances'"):
        sft(SHARED / "sft" / "stanford_alpaca_seed_tasks.jsonl")


def test_sharegpt_keeps_system_turns():
    convos, counts = sft(SHAREGPT)
    assert counts["kept"] == 30
    with_system = [c for c in convos if c[0]["role"] == "system"]
    assert len(with_system) == 8 and all(set(roles(c)[1:]) == {"user", "assistant"} for c in with_system)
    assert all(c[-1]["role"] == "assistant" for c in convos)


def test_sharegpt_pairs_read_as_sft_count_prompts_without_a_reply():
    """The DPO file's prompts as SFT conversations: the 194 single-turn prompts have no reply to learn."""
    convos, counts = sft(DPO, format="sharegpt")
    assert counts["dropped/no_assistant_turn"] == 194 and counts["trimmed/trailing_turns"] == 106
    assert counts["kept"] == len(convos) == 106


def test_messages_jsonl_and_parquet_read_the_same_conversations(tmp_path):
    import datasets

    convos, _ = sft(SHAREGPT)
    records = [{"messages": c} for c in convos]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "chat.parquet"))
    assert sft(jsonl)[0] == convos
    assert sft(tmp_path / "chat.parquet")[0] == convos
    assert sft(jsonl, max_records=3)[1]["records"] == 3


# ---- preference adapters ------------------------------------------------------------------------------------


def test_hh_pairs_and_their_drops(tmp_path):
    got, counts = pairs(HH)
    assert counts == {"records": 60, "pairs": 60, "kept": 60}
    assert all(p[0][-1]["role"] == "user" and p[1] != p[2] for p in got)
    bad = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi"},  # no reply
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: bye\n\nAssistant: ok"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}])
    assert pairs(bad)[1] == {"records": 4, "pairs": 2, "dropped/no_assistant_reply": 1,
                             "dropped/prompt_mismatch": 1, "dropped/identical_replies": 1, "kept": 1}


@needs_shared
def test_preference_adapters_on_the_shared_files():
    _, counts = pairs(SHARED / "preference" / "hh-rlhf_harmless-base_test.jsonl.gz")
    assert counts["records"] == 2312 and counts["kept"] == 2303  # 9 malformed dialogues, counted by reason:
    assert counts["dropped/empty_reply"] == 4 and counts["dropped/prompt_mismatch"] == 5  # a reply with "Human:"
    assert pairs(SHARED / "preference" / "llamafactory_dpo_en_demo.json.gz")[1]["kept"] == 300
    got, counts = pairs(SHARED / "sft" / "oasst_en_100_tree.jsonl.gz")
    assert counts["kept"] == len(got) == 754 and counts["dropped/unranked_reply"] == 6


def test_sharegpt_pairs_keep_system_turns():
    got, counts = pairs(DPO)
    assert counts["kept"] == 300
    assert sum(p[0][0]["role"] == "system" for p in got) == 80
    assert all(p[0][-1]["role"] == "user" for p in got)


def test_oasst_sibling_ranks_give_better_worse_pairs(tmp_path):
    tree = {"prompt": {"role": "prompter", "text": "Q", "replies": [
        {"role": "assistant", "text": "second", "rank": 1},
        {"role": "assistant", "text": "unranked"},
        {"role": "assistant", "text": "best", "rank": 0, "replies": [
            {"role": "prompter", "text": "more?", "replies": [{"role": "assistant", "text": "only one"}]}]},
        {"role": "assistant", "text": "third", "rank": 2}]}}
    lone = {"prompt": {"role": "prompter", "text": "Q", "replies": [{"role": "assistant", "text": "A"}]}}
    got, counts = pairs(write_jsonl(tmp_path / "t.jsonl", [tree, lone]), format="oasst")
    prompt = [{"role": "user", "content": "Q"}]
    assert got == [(prompt, "best", "second"), (prompt, "best", "third"), (prompt, "second", "third")]
    assert counts == {"records": 2, "pairs": 3, "dropped/unranked_reply": 1, "dropped/no_ranked_siblings": 1,
                      "kept": 3}
    assert pairs(OASST)[1]["kept"] == 56


# ---- bad input: counted by reason, or one line naming the file and record ----------------------------------


def test_every_bad_conversation_is_counted_by_reason(tmp_path):
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    f = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [u, a]},
        {"messages": [u]},
        {"messages": [u, {"role": "assistant", "content": "  "}]},
        {"messages": [u, {"role": "tool", "content": "42"}, a]},
        {"messages": [{"role": "system", "content": "be brief"}, u, a, u]}])
    convos, counts = sft(f)
    assert counts == {"records": 5, "conversations": 5, "dropped/no_assistant_turn": 1, "dropped/empty_assistant": 1,
                      "dropped/unknown_role": 1, "trimmed/trailing_turns": 1, "kept": 2}
    assert convos[1] == [{"role": "system", "content": "be brief"}, u, a]
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "input": "", "output": ""}])
    assert sft(alpaca)[1]["dropped/empty_assistant"] == 1
    gpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "x"},
                                                                 {"from": "function_call", "value": "{}"}]}])
    assert sft(gpt)[1]["dropped/unknown_role"] == 1


def test_unknown_layout_and_malformed_records_name_file_record_and_field(tmp_path):
    with pytest.raises(GptflowError, match=r"odd\.jsonl: record 0 has fields \['foo'\]: none of the SFT layouts"):
        sft(write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}]))
    with pytest.raises(GptflowError, match=r"odd\.jsonl: record 0 has fields \['foo'\]: none of the preference"):
        pairs(tmp_path / "odd.jsonl")
    rows = [{"messages": [{"role": "user", "content": "a"}]}, {"messages": [{"role": "user"}]}]
    with pytest.raises(GptflowError, match=r"m\.jsonl: record 1 \(messages\): messages\[0\] has no string 'role' and 'content'"):
        sft(write_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(GptflowError, match=r"a\.jsonl: record 1 \(alpaca\): field 'instruction' is NoneType"):
        sft(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"output": "y"}]))


@pytest.mark.parametrize(("name", "text", "message"), [
    ("broken.jsonl", '{"messages": []}\n{not json\n', r"broken\.jsonl: not readable as JSON \(.*\)$"),
    ("empty.jsonl", "", r"empty\.jsonl: no records"),
    ("notes.txt", "hello", r"notes\.txt: not a \.json, \.jsonl or \.parquet file \(optionally \.gz or \.bz2\)"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(GptflowError, match=message) as e:
        sft(tmp_path / name)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("encoding", "message"), [
    ("latin-1", r"chat\.jsonl:2: not UTF-8 text \(byte b'\\xe9' at column \d+: latin-1 or cp1252\?\); re-encode it as UTF-8$"),
    ("utf-16", r"chat\.jsonl: UTF-16 text \(it starts with a UTF-16 byte-order mark\); re-encode it as UTF-8$"),
])
def test_a_file_in_another_encoding_is_a_one_line_error_naming_it(tmp_path, encoding, message):
    """pyarrow reads latin-1 bytes into its strings unchecked and fails later with a bare UnicodeDecodeError."""
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Caf\u00e9?"}, {"role": "assistant", "content": "Ol\u00e9."}]}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "chat.jsonl").write_bytes(text.encode(encoding))
    for load in (sft, pairs):
        with pytest.raises(GptflowError, match=message):
            load(tmp_path / "chat.jsonl")
    (tmp_path / "chat.jsonl").write_bytes(text.encode("utf-8-sig"))  # a UTF-8 byte-order mark is read
    convos, counts = sft(tmp_path / "chat.jsonl")
    assert counts["kept"] == 2 and convos[1][0]["content"] == "Caf\u00e9?"


def test_missing_file_and_offline_hub_name_are_one_line_errors(tmp_path):
    with pytest.raises(GptflowError, match="chat data file does not exist: .*nope.jsonl"):
        sft(tmp_path / "nope.jsonl")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(GptflowError, match=r"^OpenAssistant/oasst1: not a local file, and not loadable from the Hub .*HF_HUB_OFFLINE=1") as e:
        sft("OpenAssistant/oasst1")
    assert "\n" not in str(e.value)


def test_datasets_cache_is_in_the_workspace_and_loads_send_nothing():
    import datasets

    sft(OASST)
    cache = Path(os.environ["HF_HOME"]) / "datasets"
    assert cache.is_relative_to(workspace()) and any(cache.rglob("*.arrow"))
    assert datasets.config.HF_HUB_OFFLINE and not datasets.config.HF_UPDATE_DOWNLOAD_COUNTS


# ---- mixtures -----------------------------------------------------------------------------------------------


def test_allocate_splits_by_weight_and_passes_on_shortfalls():
    assert allocate([1000, 1000], [3, 1], 400) == [300, 100]
    assert allocate([1000, 1000, 1000], [1, 1, 1], 10) == [4, 3, 3]  # the remainder to the first of equals
    assert allocate([50, 1000], [3, 1], 400) == [50, 350]  # the first source runs out; the second fills in
    assert allocate([5, 7], [1, 1], 100) == [5, 7]


def test_mixture_realises_the_weights_and_reports_them():
    sources = [SFTSource(path=str(ALPACA), weight=2.0), SFTSource(path=str(OASST), oasst_paths="all", weight=1.0),
               SFTSource(path=str(SHAREGPT), weight=1.0)]
    convos, counts = load_mixture(sources, max_examples=100, seed=0)
    assert len(convos) == counts["selected"] == 100
    for label, w in [("alpaca_en_demo", 0.5), ("oasst_en_tree_sample", 0.25), ("sharegpt_chosen_demo", 0.25)]:
        assert counts[f"mix/{label}_weight"] == w
        assert abs(counts[f"mix/{label}_share"] - w) <= 0.01
    assert counts["source/oasst_en_tree_sample/kept"] == 54 and counts["records"] == 999 + 10 + 30
    assert load_mixture(sources, 100, seed=0)[0] == convos and load_mixture(sources, 100, seed=1)[0] != convos
    # ShareGPT has only 30: asking for 200 gives it all 30 and the others the rest, and says so.
    _, counts = load_mixture(sources, max_examples=200, seed=0)
    assert counts["mix/sharegpt_chosen_demo_selected"] == 30 and counts["selected"] == 200


def test_preference_mixture():
    sources = [PreferenceSource(path=str(DPO), weight=1.0), PreferenceSource(path=str(HH), weight=1.0),
               PreferenceSource(path=str(OASST), weight=1.0)]
    got, counts = load_preference_mixture(sources, max_pairs=90, seed=0)
    assert len(got) == 90 and {counts[f"mix/{s.label}_selected"] for s in sources} == {30}


def test_system_and_history_columns(tmp_path):
    """LLaMA-Factory's optional columns: `system` (Alpaca and ShareGPT) and Alpaca's `history` of earlier turns."""
    f = write_jsonl(tmp_path / "a.jsonl", [{"system": "be brief", "history": [["hi", "hello"]], "instruction": "add",
                                            "input": "2 and 2", "output": "4"}])
    assert sft(f)[0] == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "add\n\n2 and 2"},
                          {"role": "assistant", "content": "4"}]]
    g = write_jsonl(tmp_path / "s.jsonl", [{"system": "be brief", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    assert roles(sft(g)[0][0]) == ["system", "user", "assistant"]


def test_oasst_flat_export_reads_as_the_trees(tmp_path):
    """The Hub's OpenAssistant/oasst1 layout (one row per message, `parent_id` links), here made from the
    bundled trees and written as Parquet, gives the same conversations and pairs as the tree export."""
    import datasets

    def rows(node, parent=None):
        me = {"message_id": node["message_id"], "parent_id": parent, "role": node["role"], "text": node["text"],
              "rank": node.get("rank")}
        return [me] + [r for reply in node.get("replies", []) for r in rows(reply, node["message_id"])]

    flat = [r for line in gzip.open(OASST, "rt") for r in rows(json.loads(line)["prompt"])]
    datasets.Dataset.from_list(flat).to_parquet(str(tmp_path / "oasst.parquet"))
    for paths in ("best", "all"):
        assert sft(tmp_path / "oasst.parquet", oasst_paths=paths)[0] == sft(OASST, oasst_paths=paths)[0]
    assert pairs(tmp_path / "oasst.parquet")[0] == pairs(OASST)[0]
    # Without the first tree's root: its other messages lost their parent, and are counted, not silently lost.
    datasets.Dataset.from_list(flat[1:]).to_parquet(str(tmp_path / "cut.parquet"))
    convos, counts = sft(tmp_path / "cut.parquet")
    first_tree = len(rows(json.loads(gzip.open(OASST, "rt").readline())["prompt"]))
    assert counts["dropped/orphan_message"] == first_tree - 1 and len(convos) == 9


def test_a_folder_in_hub_layout_loads_by_split(tmp_path):
    """A downloaded Hub snapshot (data files named by split) goes through the same `load_dataset(name, split)`
    call as a Hub name, so this checks that path without the network."""
    import datasets

    convos, _ = sft(SHAREGPT)
    (tmp_path / "snap" / "data").mkdir(parents=True)
    for split, part in (("train", convos[:20]), ("test", convos[20:])):
        datasets.Dataset.from_list([{"messages": c} for c in part]).to_parquet(
            str(tmp_path / "snap" / "data" / f"{split}-00000-of-00001.parquet"))
    assert sft(tmp_path / "snap")[0] == convos[:20]
    assert sft(tmp_path / "snap", split="test")[0] == convos[20:]
    assert sft(tmp_path / "snap", max_records=4)[1]["records"] == 4
    (tmp_path / "bare").mkdir()
    with pytest.raises(GptflowError, match=r"bare: a folder that datasets cannot read as a dataset \("):
        sft(tmp_path / "bare")


def test_oasst_deleted_and_rejected_messages_are_cut_and_counted(tmp_path):
    tree = {"prompt": {"role": "prompter", "text": "Q", "replies": [
        {"role": "assistant", "text": "spam", "rank": 0, "review_result": False, "replies": [
            {"role": "prompter", "text": "under spam", "replies": []}]},
        {"role": "assistant", "text": "good", "rank": 1, "deleted": False},
        {"role": "assistant", "text": "gone", "rank": 2, "deleted": True}]}}
    gone = {"prompt": {"role": "prompter", "text": "Q", "deleted": True, "replies": []}}
    f = write_jsonl(tmp_path / "t.jsonl", [tree, gone])
    convos, counts = sft(f, format="oasst", oasst_paths="all")
    assert convos == [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}]]
    assert counts["dropped/oasst_deleted_or_rejected"] == 4 and counts["kept"] == 1
    got, counts = pairs(f, format="oasst")
    assert got == [] and counts["dropped/oasst_deleted_or_rejected"] == 4 and counts["dropped/no_ranked_siblings"] == 2


def test_message_list_pairs_read_as_the_same_pairs(tmp_path):
    """TRL's conversational preference layout (whole dialogues, or replies after a `prompt`), made from the
    bundled ShareGPT pairs, gives the same pairs; a dialogue whose prompt differs is counted."""
    want, _ = pairs(DPO)
    whole = [{"chosen": p + [{"role": "assistant", "content": c}], "rejected": p + [{"role": "assistant", "content": r}]}
             for p, c, r in want]
    split = [{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
              "rejected": [{"role": "assistant", "content": r}]} for p, c, r in want]
    assert pairs(write_jsonl(tmp_path / "whole.jsonl", whole))[0] == want
    assert pairs(write_jsonl(tmp_path / "split.jsonl", split))[0] == want
    odd = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
           "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}
    assert pairs(write_jsonl(tmp_path / "odd.jsonl", [odd]))[1]["dropped/prompt_mismatch"] == 1
