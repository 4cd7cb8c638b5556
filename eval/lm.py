"""gptflow's lm-eval model: `GPTFlowLM`, an lm-eval `LM` registered as "gptflow" that wraps a `models.gpt.GPT`
and a Hugging Face `tokenizers.Tokenizer`. Usable from `lm_eval.simple_evaluate(model="gptflow",
model_args="model_dir=...,tokenizer=...,batch_size=16")` once this module is imported, or directly.

Scoring follows lm-eval's HF model (`HFLM`): a context's trailing whitespace moves into the continuation, the
continuation tokens are `encode(context + continuation)[len(encode(context)):]`, an empty context is replaced
by the end-of-text token, and inputs longer than the model's block size keep their rightmost tokens. Rolling
log-likelihoods (perplexity tasks) use disjoint prediction windows of `block_size` tokens, each with as much
preceding context as fits, starting from the end-of-text token; every token is predicted exactly once.

Requests are batched longest first (right padding never changes a causal model's real positions); generation is
greedy with the KV cache (`models.generate`), requests of equal generation settings batched together. With
`apply_chat_template` lm-eval renders prompts in our one chat template (`models.tokens`), as the SFT stage trained.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer
from torch.nn import functional as F

from models.tokens import CHAT_TEMPLATE, END, EOT, role_token

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256
LOGITS_BUDGET = 1 << 28  # max batch * time * vocab floats of logits held at once (1 GiB in fp32)


@register_model("gptflow")
class GPTFlowLM(LM):
    """lm-eval `LM` over (GPT, tokenizers.Tokenizer).

    Give either `model` + `tokenizer` objects, or `model_dir` (a `models.checkpoint.save_model` folder) +
    `tokenizer` (a tokenizer.json path). Any module whose `forward(idx)` returns `(logits, _)` and whose
    `config.block_size` is set works; `max_length` overrides the block size.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        tokenizer: Tokenizer | str | Path | None = None,
        model_dir: str | Path | None = None,
        batch_size: int | str | None = 16,
        device: str | torch.device | None = "auto",
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        eot_token: str = EOT,
        use_kv_cache: bool = True,
        **unused: Any,
    ) -> None:
        super().__init__()
        unused = {k: v for k, v in unused.items() if v is not None and k not in ("max_batch_size",)}
        if unused:
            log.warning("gptflow LM ignores arguments %s", sorted(unused))
        self._device = pick_device(device)
        if model is None:
            if model_dir is None:
                raise ValueError("gptflow LM needs model=<GPT> or model_dir=<folder with model.safetensors>")
            from models.checkpoint import load_model

            model = load_model(Path(model_dir), device=self._device)
        self.model = model.to(self._device).eval()
        if tokenizer is None:
            raise ValueError("gptflow LM needs tokenizer=<tokenizers.Tokenizer or path to tokenizer.json>")
        tokenizer_source = str(tokenizer) if isinstance(tokenizer, (str, Path)) else "(given)"
        if isinstance(tokenizer, (str, Path)):
            path = Path(tokenizer)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
            tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer = tokenizer
        eot = tokenizer.token_to_id(eot_token)
        if eot is None:
            eot = getattr(getattr(model, "config", None), "eot_id", None)
        if eot is None:
            raise ValueError(f"tokenizer has no {eot_token!r} token and the model config no eot_id")
        self._eot_id = int(eot)
        self.eot_token = eot_token
        block = max_length or getattr(getattr(model, "config", None), "block_size", None)
        if not block:
            raise ValueError("cannot tell the context length: pass max_length or use a model with config.block_size")
        self._max_length = int(block)
        self.batch_size = _parse_batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.use_kv_cache = use_kv_cache
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab is not None and n_tokens > vocab:
            where = f"model {model_dir}" if model_dir is not None else "the model"
            raise ValueError(f"tokenizer {tokenizer_source} has {n_tokens} tokens but {where} has vocab_size {vocab}: "
                             "not the tokenizer this model was trained with")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> GPTFlowLM:
        """`model_dir=DIR,tokenizer=FILE[,batch_size=N,device=cpu,max_length=N,max_gen_toks=N]`.

        Values in arg_string win over `additional_config` (what simple_evaluate passes: batch_size, device),
        so giving batch_size in both places is not an error.
        """
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # -- basic properties ----------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """Names lm-eval's request-cache files: the tokenizer's content hash, so two tokenizers never share one."""
        digest = hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()[:16]
        return f"gptflow-{digest}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The one chat template (the Jinja form the Hugging Face export carries), when chat is asked for."""
        return CHAT_TEMPLATE if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`<|user|>question<|end|><|assistant|>`: the turns as `tasks.chat.render` tokenizes them for SFT (its role
        and end tokens are special tokens, so encoding this string gives the same ids)."""
        for m in chat_history:
            if self.tokenizer.token_to_id(role_token(m["role"])) is None:
                raise ValueError(f"chat template: the tokenizer has no token for role {m['role']!r}")
        text = "".join(role_token(m["role"]) + m["content"] + END for m in chat_history)
        return text + (role_token("assistant") if add_generation_prompt else "")

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) the way lm-eval's causal HF model splits them."""
        if context == "":
            cont = self.tok_encode(continuation)
            if cont and cont[0] == self._eot_id:
                return cont[:1], cont[1:]
            return [self._eot_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if not ctx:  # a whitespace-only context: condition on the end-of-text token instead
            return [self._eot_id], whole
        return ctx, whole[len(ctx) :]

    # -- scoring core ----------------------------------------------------------------------------------------

    def _windows(self, tokens: list[int], n_pred: int) -> list[tuple[list[int], list[int]]]:
        """(input, targets) windows that predict the last n_pred of `tokens` once each, with the most context.

        A window predicting tokens[a:b] (b - a <= block) feeds tokens[max(0, b-1-block) : b-1]; its last b - a
        outputs are the predictions. One window when n_pred <= block (HFLM's left truncation), else a rolling
        series like lm-eval's get_rolling_token_windows + make_disjoint_window.
        """
        block, n = self._max_length, len(tokens)
        if not 0 <= n_pred < n:
            raise ValueError(f"cannot predict {n_pred} of {n} tokens (the first token has no context)")
        out = []
        a = n - n_pred
        while a < n:
            b = min(a + block, n)
            out.append((tokens[max(0, b - 1 - block) : b - 1], tokens[a:b]))
            a = b
        return out

    @torch.inference_mode()
    def _score(self, seqs: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n_pred): sum of log p(token | preceding tokens) over the last n_pred tokens, and
        whether every one of them is the argmax prediction. Windows of all sequences are batched together,
        longest first, right-padded (causal attention, so padding never affects real positions)."""
        windows = []  # (seq index, input, targets)
        for i, (tokens, n_pred) in enumerate(seqs):
            windows.extend((i, inp, tgt) for inp, tgt in self._windows(tokens, n_pred))
        windows.sort(key=lambda w: -len(w[1]))
        logprob = torch.zeros(len(seqs), dtype=torch.float64)
        misses = torch.zeros(len(seqs), dtype=torch.long)
        head_only = hasattr(self.model, "hidden_states") and hasattr(self.model, "lm_head")
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None) or 65536
        start = 0
        while start < len(windows):
            longest = len(windows[start][1])
            end, logits = start, 0  # (N, V) logits of a batch stay under LOGITS_BUDGET (rolling windows: N ~ B * T)
            while end < len(windows) and end - start < self.batch_size:
                logits += (len(windows[end][2]) if head_only else longest) * vocab
                if end > start and logits > LOGITS_BUDGET:
                    break
                end += 1
            batch = windows[start:end]
            start = end
            lp, hit = self._target_logprobs(batch, longest, head_only)  # (N,) each, N = targets in the batch
            owner = torch.tensor([i for i, _, tgt in batch for _ in tgt])  # (N,) the sequence of each target
            logprob.index_add_(0, owner, lp.double().cpu())
            misses.index_add_(0, owner, (~hit).long().cpu())
        return [(lp, miss == 0) for lp, miss in zip(logprob.tolist(), misses.tolist(), strict=True)]

    def _target_logprobs(self, batch: list[tuple[int, list[int], list[int]]], longest: int,
                         head_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of each target token of a batch of windows, and whether it is the argmax. A GPT runs its output
        head only on the target positions (`hidden_states`, then `lm_head`): no (B, T, V) logits."""
        x = torch.zeros(len(batch), longest, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, (_, inp, tgt) in enumerate(batch):
            x[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            rows += [r] * len(tgt)
            cols += range(len(inp) - len(tgt), len(inp))
            targets += tgt
        x = x.to(self._device)
        if head_only:
            logits = self.model.lm_head(self.model.hidden_states(x)[rows, cols])  # (N, V)
        else:
            logits = self.model(x)[0][rows, cols]  # (N, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(targets, dtype=torch.long, device=logp.device)
        return logp.gather(1, target.unsqueeze(1)).squeeze(1), logp.argmax(dim=-1) == target

    # -- lm-eval API -------------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        seqs, empty = [], []
        for k, req in enumerate(requests):
            context, continuation = req.args[0], req.args[1]
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:  # nothing to score (e.g. an empty continuation)
                empty.append(k)
                seqs.append(None)
                continue
            seqs.append((ctx + cont, len(cont)))
        scored = iter(self._score([s for s in seqs if s is not None]))
        out = [(0.0, True) if s is None else next(scored) for s in seqs]
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        seqs = []
        for req in requests:
            tokens = self.tok_encode(req.args[0])
            seqs.append(([self._eot_id] + tokens, len(tokens)) if tokens else None)
        scored = iter(self._score([s for s in seqs if s is not None]))
        out = [0.0 if s is None else next(scored)[0] for s in seqs]
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the KV cache: requests with the same generation settings are decoded together,
        `batch_size` at a time, longest prompt first. A context longer than `block_size - max_gen_toks + 1`
        keeps its rightmost tokens (HFLM does the same). The text ends before the first stop string."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for k, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items())), []).append(k)
        for ks in groups.values():
            until, max_new = self._gen_settings(requests[ks[0]].args[1])
            room = max(1, self._max_length - max_new + 1)  # the last generated token is never fed back
            prompts = {k: (self.tok_encode(requests[k].args[0]) or [self._eot_id])[-room:] for k in ks}
            order = sorted(ks, key=lambda k: -len(prompts[k]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                new = self._greedy([prompts[k] for k in batch], min(max_new, self._max_length))
                for k, ids in zip(batch, new, strict=True):
                    text = self.tok_decode(ids)
                    out[k] = text[: min((text.find(s) for s in until if s and s in text), default=len(text))]
        for req, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out  # type: ignore[return-value]

    def _gen_settings(self, gen_kwargs: dict | None) -> tuple[list[str], int]:
        """(stop strings incl. the end-of-text token, max new tokens) of a request; sampling is not supported."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if self.eot_token not in until:
            until.append(self.eot_token)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0.0:
            log.warning("gptflow LM decodes greedily; ignoring sampling arguments %s", gen_kwargs)
        return until, max_new

    @torch.inference_mode()
    def _greedy(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        """New tokens of each prompt, greedy, stopping at the end-of-text token (`models.generate`)."""
        from models.generate import generate

        return generate(self.model, prompts, max_new, temperature=0.0, stop_ids=[self._eot_id],
                        use_cache=self.use_kv_cache)


def pick_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): the GPU when there is one, else the CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _parse_batch_size(batch_size: int | str | None) -> int:
    if batch_size is None:
        return 16
    if isinstance(batch_size, str):
        if batch_size.startswith("auto"):
            log.warning("gptflow LM has no automatic batch size; using 16")
            return 16
        batch_size = int(batch_size)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)
