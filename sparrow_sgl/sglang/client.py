"""Rollout client for an SGLang server (started by `sparrow serve`): returns the engine-neutral `Rollout`s.

    client = SGLangRolloutClient("http://127.0.0.1:30000")
    rollouts = client.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=512, n=8, logprobs_topk=20),
                               schedule="qwen3-4b-0.86")

Log-prob semantics: SGLang returns, for each sampled token, its log-prob under softmax(logits / temperature) —
the distribution actually sampled when top-p/top-k are off (the RL setting); with top-p/top-k on, SGLang's values
are before that filtering, unlike the embedded engine. Greedy requests (temperature 0) get the plain softmax.

Weight/adapter updates: every update flushes SGLang's prefix cache (KV computed with the old weights must not be
reused) and then runs a greedy canary request, so a stale cache or an adapter that changed nothing is caught at once.
A loaded rollout adapter becomes the default of every `generate` call (`lora=...` to override; `lora=None` for base),
so rollouts never silently fall back to the base model.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from sparrow_sgl.config import Schedule
from sparrow_sgl.rollout import Rollout
from sparrow_sgl.sglang.request_state import META_KEY, SCHEDULE_KEY

_DEFAULT = object()
CANARY_PROMPT = list(range(10, 42))


class SGLangError(RuntimeError):
    """The server refused or failed a request; `status` is the HTTP status (0 when unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"SGLang server answered {status}: {message}" if status else message)
        self.status = status


@dataclass
class Canary:
    token_ids: list[int]
    logprobs: list[float]


class SGLangRolloutClient:
    def __init__(self, url: str, timeout: float = 600.0, max_concurrency: int = 64, tokenizer=None) -> None:
        """`tokenizer` (optional, HF): text prompts are encoded here so that `Rollout.prompt_ids` is filled."""
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.lora: str | None = None  # the rollout adapter every request uses by default
        self.last_canary: Canary | None = None

    # -- generation -------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params,
        schedule: str | dict | Schedule | None = None,
        lora=_DEFAULT,
        progress: bool = False,
    ) -> list[Rollout]:
        """`len(prompts) * params.n` rollouts, prompt-major. `params` has the fields of `engine.SamplingParams`."""
        if self.tokenizer is not None:
            prompts = [self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in prompts]
        n = int(getattr(params, "n", 1))
        jobs = [(i, j, p) for i, p in enumerate(prompts) for j in range(n)]
        lora = self.lora if lora is _DEFAULT else lora
        bodies = [self._request_body(p, params, j, schedule, lora) for i, j, p in jobs]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(bodies)))) as pool:
            results = pool.map(lambda b: self.post("/generate", b), bodies)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(bodies), desc="rollouts", unit="req")
            results = list(results)
        return [self._to_rollout(r, body, i, j) for (i, j, _), body, r in zip(jobs, bodies, results)]

    def _request_body(self, prompt, params, sample_index: int, schedule, lora) -> dict:
        sampling = {
            "temperature": float(getattr(params, "temperature", 1.0)),
            "top_p": float(getattr(params, "top_p", 1.0)),
            "top_k": int(getattr(params, "top_k", 0)) or -1,
            "max_new_tokens": int(getattr(params, "max_new_tokens", 256)),
            "ignore_eos": bool(getattr(params, "ignore_eos", False)),
        }
        stop = list(getattr(params, "stop_token_ids", ()) or ())
        if stop:
            sampling["stop_token_ids"] = stop
        seed = getattr(params, "seed", None)
        if seed is not None:
            sampling["sampling_seed"] = int(seed) + sample_index
        if schedule is not None:
            spec = schedule.to_dict() if isinstance(schedule, Schedule) else schedule
            sampling["custom_params"] = {SCHEDULE_KEY: spec}
        body = {
            "sampling_params": sampling,
            "return_logprob": True,
            "top_logprobs_num": int(getattr(params, "logprobs_topk", 0)),
        }
        body["text" if isinstance(prompt, str) else "input_ids"] = prompt
        if lora is not None:
            body["lora_path"] = lora
        return body

    @staticmethod
    def _to_rollout(result: dict, body: dict, prompt_index: int, sample_index: int) -> Rollout:
        meta = result["meta_info"]
        token_logprobs = meta.get("output_token_logprobs") or []
        topk = body["top_logprobs_num"]
        top = meta.get("output_top_logprobs") if topk else None
        finish = meta.get("finish_reason") or {}
        sparrow = meta.get(META_KEY) or {}
        prompt_ids = body.get("input_ids")
        return Rollout(
            prompt_ids=list(prompt_ids) if prompt_ids is not None else [],
            token_ids=list(result.get("output_ids") or [t[1] for t in token_logprobs]),
            logprobs=[float(t[0]) for t in token_logprobs],
            finish_reason=finish.get("type", "length") if isinstance(finish, dict) else str(finish),
            topk_ids=[[int(e[1]) for e in step] for step in top] if top is not None else None,
            topk_logprobs=[[float(e[0]) for e in step] for step in top] if top is not None else None,
            prompt_index=prompt_index,
            sample_index=sample_index,
            text=result.get("text"),
            meta={
                "schedule": sparrow.get("schedule", "dense (stock backend)"),
                "kv_tokens_mean": sparrow.get("kv_tokens_mean"),
                "engine": "sglang",
                "lora": body.get("lora_path"),
            },
        )

    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        sparse=None,
        topk: int = 0,
        temperature: float = 1.0,
        lora=_DEFAULT,
    ) -> list[ScoreResult]:
        """Dense teacher-forced log-probs of `response_ids` (one prefill per pair; prefill is always dense).

        Mirrors `Engine.score` for `sparse=None` at temperature 1, which is what top-k mismatch calibration needs;
        sparse teacher forcing is not offered (use the rollout's own log-probs, which come from the sparse decode).
        """
        if sparse is not None:
            raise ValueError("SGLang scoring is dense only: the sparse log-probs are the rollout's own")
        if temperature != 1.0:
            raise ValueError("SGLang scoring returns temperature-1 log-probs only")
        lora = self.lora if lora is _DEFAULT else lora
        bodies = []
        for prompt, response in zip(prompt_ids, response_ids, strict=True):
            body = {
                "input_ids": list(prompt) + list(response),
                "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                "return_logprob": True,
                "logprob_start_len": max(len(prompt) - 1, 0),  # SGLang reports None for the window's first token
                "top_logprobs_num": int(topk),
            }
            if lora is not None:
                body["lora_path"] = lora
            bodies.append(body)
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(bodies)))) as pool:
            results = list(pool.map(lambda b: self.post("/generate", b), bodies))
        return [_score_result(r, list(resp), topk) for r, resp in zip(results, response_ids)]

    # -- weights and adapters ---------------------------------------------------------------------------------
    def flush_cache(self) -> None:
        self.post("/flush_cache", {}, expect_json=False)

    def canary(self, max_new_tokens: int = 16) -> Canary:
        """Greedy tokens + log-probs of a fixed prompt (with the default adapter), remembered as `last_canary`."""
        body = {
            "input_ids": CANARY_PROMPT,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
            "return_logprob": True,
        }
        if self.lora is not None:
            body["lora_path"] = self.lora
        out = self.post("/generate", body)
        logprobs = [float(t[0]) for t in out["meta_info"]["output_token_logprobs"]]
        self.last_canary = Canary(list(out["output_ids"]), logprobs)
        return self.last_canary

    def load_lora(self, path: str, name: str = "rollout", require_change: bool = True) -> Canary:
        """Load a peft adapter dir as the default rollout adapter; flush the cache; check the canary changed."""
        before = self.canary()
        self.post("/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        self.lora = name
        self.flush_cache()
        after = self.canary()
        if require_change and after == before:
            raise SGLangError(0, f"adapter {name} ({path}) left the canary unchanged: stale cache or adapter dropped")
        return after

    def unload_lora(self, name: str | None = None) -> Canary:
        """Unload the adapter (default: the current rollout adapter); rollouts use the base model again."""
        name = name or self.lora
        if name is None:
            raise ValueError("no adapter is loaded")
        self.post("/unload_lora_adapter", {"lora_name": name})
        if name == self.lora:
            self.lora = None
        self.flush_cache()
        return self.canary()

    def update_weights_from_disk(self, model_path: str) -> Canary:
        """Reload the base weights from a HF dir (same architecture); flush the cache; return the new canary."""
        self.post("/update_weights_from_disk", {"model_path": str(model_path)})
        self.flush_cache()
        return self.canary()

    # -- HTTP -------------------------------------------------------------------------------------------------
    def post(self, path: str, body: dict, expect_json: bool = True):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        return self._send(request, expect_json)

    def get(self, path: str, expect_json: bool = True):
        return self._send(urllib.request.Request(self.url + path), expect_json)

    def _send(self, request: urllib.request.Request, expect_json: bool):
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read().decode()
        except urllib.error.HTTPError as e:
            raise SGLangError(e.code, _error_message(e.read().decode(errors="replace"))) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise SGLangError(0, f"SGLang server at {self.url} unreachable: {e}") from None
        return json.loads(payload) if expect_json else payload


@dataclass
class ScoreResult:
    logprobs: torch.Tensor  # [T] float32
    topk_ids: torch.Tensor | None = None  # [T, k]
    topk_logprobs: torch.Tensor | None = None


def _score_result(result: dict, response: list[int], topk: int) -> ScoreResult:
    meta = result["meta_info"]
    length = len(response)
    entries = (meta.get("input_token_logprobs") or [])[-length:] if length else []
    # SGLang 0.5.23 reports the id vocab_size - 1 as 0 in input log-probs (an image-hash clip); the value is right
    aligned = all(int(e[1]) in (t, 0) for e, t in zip(entries, response)) and len(entries) == length
    if not aligned or any(e[0] is None for e in entries):
        raise SGLangError(0, "the server's input log-probs do not line up with the response tokens")
    logprobs = torch.tensor([float(e[0]) for e in entries], dtype=torch.float32)
    if not topk:
        return ScoreResult(logprobs)
    top = (meta.get("input_top_logprobs") or [])[-length:]
    ids = torch.tensor([[int(e[1]) for e in step] for step in top], dtype=torch.long).view(length, topk)
    vals = torch.tensor([[float(e[0]) for e in step] for step in top], dtype=torch.float32).view(length, topk)
    return ScoreResult(logprobs, ids, vals)


def _error_message(payload: str) -> str:
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        return payload.strip()
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)
