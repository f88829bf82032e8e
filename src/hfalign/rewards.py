"""Rewards from anywhere, as one kind of object the PPO trainer calls: a scorer `(prompts, completions) -> scores`.

    ModelScorer   a sequence-classification reward model with its own tokenizer and chat template: the policy's
                  prompt and response, as text (a conversational prompt as its messages), re-rendered with the RM's
                  template, tokenized by the RM's tokenizer, scored by the RM as it scored when trained
    RemoteScorer  a reward server (`hfalign serve-reward`) over HTTP: timeouts, retries with backoff, and a clear
                  RewardUnavailable naming the URL when it is down -- never a silent zero
    Combined      named sources with weights, each normalised or not, each logged as reward/<name>; their weighted
                  sum is what PPO optimises

A scorer with `takes_messages = True` receives each prompt as the dataset held it (text, or a list of chat messages);
any other function (a user's rule) receives the prompt as text. Completions are text without the stop token (the
policy's EOS and end-of-turn tokens are not passed through). A reward model that shares the policy's tokenizer is
scored on the policy's token ids inside the PPO model instead (no re-tokenization): ppo/build.py decides which.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from hfalign.errors import UserError

MAX_REQUEST_BYTES = 16 * 2**20  # a reward server refuses larger requests (413)


class RewardUnavailable(UserError):
    """A reward source cannot answer (a server down after every retry): the run stops at a checkpoint."""


def _as_text(prompt) -> str:
    """A prompt as plain text: a conversation's contents, one per line (for sources without a chat template)."""
    return prompt if isinstance(prompt, str) else "\n".join(m.get("content", "") for m in prompt)


class ModelScorer:
    """A reward model (AutoModelForSequenceClassification, one label) with its own tokenizer."""

    takes_messages = True

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None):
        import torch

        self.model, self.tokenizer, self.batch_size, self.max_length = model.eval(), tokenizer, batch_size, max_length
        for p in self.model.parameters():
            p.requires_grad_(False)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        if getattr(self.model.config, "pad_token_id", None) is None:  # the model finds the last token past the pads
            self.model.config.pad_token_id = self.pad_id
        self.device = next(self.model.parameters()).device
        self._torch = torch

    @classmethod
    def load(cls, path: str, tokenizer: str | None = None, dtype=None, device=None, **kw) -> ModelScorer:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer or path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **({"dtype": dtype} if dtype else {}))
        return cls(model.to(device) if device is not None else model, tok, **kw)

    def to(self, device) -> ModelScorer:
        self.model.to(device)
        self.device = next(self.model.parameters()).device
        return self

    def render(self, prompt, completion: str) -> tuple[str, bool]:
        """(text, whether it already holds the template's special tokens): a conversation through the RM's chat
        template with the completion as the assistant's turn (the template ends the turn); a text prompt (or no
        template) as prompt + completion + the RM's EOS token -- what TRL's RewardTrainer appends to every
        non-conversational example, so the RM is read where it was trained to be."""
        if not isinstance(prompt, str) and getattr(self.tokenizer, "chat_template", None):
            chat = [*prompt, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(chat, tokenize=False), True
        text, eos = _as_text(prompt) + completion, self.tokenizer.eos_token
        return (text + eos if eos and not text.endswith(eos) else text), False

    def encode(self, prompts: list, completions: list[str]) -> list[list[int]]:
        out = []
        for prompt, completion in zip(prompts, completions):
            text, templated = self.render(prompt, completion)
            kw = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
            out.append(self.tokenizer(text, add_special_tokens=not templated, **kw)["input_ids"])
        return out

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        torch, scores = self._torch, []
        ids = self.encode(prompts, completions)
        with torch.no_grad():
            for i in range(0, len(ids), self.batch_size):
                chunk = ids[i:i + self.batch_size]
                width = max(len(x) for x in chunk)
                batch = torch.tensor([x + [self.pad_id] * (width - len(x)) for x in chunk], device=self.device)
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=self.device)
                scores += self.model(input_ids=batch, attention_mask=mask).logits[:, 0].float().tolist()
        return scores


class RemoteScorer:
    """POST {"prompts": [...], "completions": [...]} to `url` -> {"scores": [...]} (the protocol of serve-reward)."""

    takes_messages = True

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0):
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        body = json.dumps({"prompts": prompts, "completions": completions}).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{self.url}/score", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    scores = json.loads(response.read())["scores"]
                break
            except urllib.error.HTTPError as e:  # the server answered: a mistake of ours, not worth retrying
                detail = e.read().decode(errors="replace")[:300]
                raise UserError(f"reward server {self.url} refused the request: HTTP {e.code} {detail}",
                                fix="check the server's log; prompts and completions must be lists of equal length") from None
            except (OSError, ValueError, KeyError) as e:  # refused, reset, timed out, or not the protocol
                last = e
        else:
            raise RewardUnavailable(f"reward server {self.url} did not answer after {self.retries + 1} tries "
                                    f"({type(last).__name__}: {last}).",
                                    fix="start it (hfalign serve-reward MODEL --port ...) and run the same command "
                                        "again: the run resumes from its last checkpoint")
        if len(scores) != len(completions):
            raise UserError(f"reward server {self.url} returned {len(scores)} scores for {len(completions)} completions.",
                            fix="serve the reward with hfalign serve-reward, or answer one score per completion")
        return [float(s) for s in scores]


class Combined:
    """sum_i weight_i x source_i(prompts, completions), each source's scores first normalised by its running mean
    and std where asked; `metrics` holds each source's mean raw score of the last call (logged as reward/<name>)."""

    takes_messages = True

    def __init__(self, sources: list[tuple[str, object, float, bool]], to_text=_as_text):
        from hfalign.ppo.core import RunningMoments

        self.sources, self.to_text, self.metrics = sources, to_text, {}
        self.moments = {name: RunningMoments() for name, _, _, normalize in sources if normalize}

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        import torch

        total = torch.zeros(len(completions))
        for name, source, weight, _ in self.sources:
            given = prompts if getattr(source, "takes_messages", False) else [self.to_text(p) for p in prompts]
            scores = torch.tensor([float(x) for x in source(given, completions)])
            if len(scores) != len(completions):
                raise UserError(f"reward source {name!r} returned {len(scores)} scores for {len(completions)} completions.",
                                fix="return one float per completion, in order")
            self.metrics[f"reward/{name}"] = scores.mean().item()
            if name in self.moments:
                self.moments[name].update(scores)
                scores = (scores - self.moments[name].mean) / self.moments[name].std
            total += weight * scores
        return total.tolist()

    def state(self) -> dict:
        return {name: m.state() for name, m in self.moments.items()}

    def load_state(self, state: dict) -> None:
        from hfalign.ppo.core import RunningMoments

        for name, saved in (state or {}).items():
            if name in self.moments:
                self.moments[name] = RunningMoments(**saved)


def from_recipe(recipe, tokenizer, device=None):
    """The scorer a PPO recipe's reward section asks for, or None when reward.model scores the policy's token ids
    inside the PPO model (same tokenizer: ppo/build.py). `tokenizer`: the policy's (prompts as text for functions)."""
    from hfalign.ppo.build import scores_text
    from hfalign.recipe import import_function, source_name

    r = recipe.reward
    dtype = recipe.model.dtype if recipe.model.dtype not in (None, "auto") else None

    def one(source: dict):
        if source.get("function"):
            return import_function(source["function"], "reward.function")
        if source.get("url"):
            return RemoteScorer(source["url"], timeout=r.timeout, retries=r.retries)
        return ModelScorer.load(source["model"], source.get("tokenizer"), dtype=_dtype(dtype), device=device)

    if r.sources:
        def to_text(prompt) -> str:  # what a plain function gets for a conversation: the policy's rendering, as text
            if isinstance(prompt, str):
                return prompt
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            return tokenizer.decode(ids, skip_special_tokens=True)

        return Combined([(source_name(s), one(s), float(s.get("weight", 1.0)), bool(s.get("normalize", False)))
                         for s in r.sources], to_text)
    if r.function or r.url:
        return one(vars(r))
    return one(vars(r)) if scores_text(recipe, tokenizer) else None


def _dtype(name):
    import torch

    return getattr(torch, name) if isinstance(name, str) else name


# -- the server ---------------------------------------------------------------------------------------------------
def serve(scorer: ModelScorer, host: str = "127.0.0.1", port: int = 8000, name: str = "") -> None:
    """Serve `scorer` over HTTP until interrupted (stdlib ThreadingHTTPServer; one scoring at a time, each request
    a batch): GET /health -> {"status": "ok", "model": name}; POST /score {"prompts", "completions"} -> {"scores"}.
    Bodies over MAX_REQUEST_BYTES get 413, malformed ones 400 with what is wrong."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "model": name})
            else:
                self._send(404, {"error": f"no {self.path}; GET /health or POST /score"})

        def do_POST(self):
            if self.path.rstrip("/") != "/score":
                return self._send(404, {"error": f"no {self.path}; POST /score"})
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_REQUEST_BYTES:
                return self._send(413, {"error": f"request of {size} bytes; at most {MAX_REQUEST_BYTES}: send smaller batches"})
            try:
                body = json.loads(self.rfile.read(size))
                prompts, completions = body["prompts"], body["completions"]
                if not isinstance(prompts, list) or not isinstance(completions, list) or len(prompts) != len(completions):
                    raise ValueError("prompts and completions must be lists of equal length")
            except (ValueError, KeyError, TypeError) as e:
                return self._send(400, {"error": f"{type(e).__name__}: {e}"})
            with lock:
                scores = scorer(prompts, completions)
            self._send(200, {"scores": scores})

        def log_message(self, fmt, *args):  # one line per request on stderr, no reverse DNS
            print(f"hfalign serve-reward: {self.address_string()} {fmt % args}", flush=True)

    server = ThreadingHTTPServer((host, port), Handler)
    print(f"hfalign serve-reward: {name} on http://{host}:{server.server_address[1]} (POST /score, GET /health)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
