"""The HTTP server, for real over 127.0.0.1: the official ``openai`` client for plain and
streamed completions, stories, stop strings, errors in OpenAI's shape, a client that
leaves mid-stream, and the ``serve`` command."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import serving
import tiny_run
import torch
from child_process import start_cli

from deepseek_mini import generate
from deepseek_mini.cli.main import main
from deepseek_mini.data.instruct import instruct_prompt
from deepseek_mini.inference.batcher import Finish
from deepseek_mini.inference.prompts import completion_text, prompt_ids


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serving.running_server(tmp_path_factory.mktemp("serve")) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def expected(served, prompt: str, max_tokens: int) -> str:
    """What ``generate`` writes greedily after ``prompt`` alone."""
    ids = torch.tensor([[served.tok.eos_id, *served.tok.encode(prompt)]])
    out = generate(served.model, ids, max_new_tokens=max_tokens, eos_id=served.tok.eos_id)
    return completion_text(served.tok, out[0, ids.shape[1]:].tolist())


def post(served, path: str, body: dict) -> tuple[str, str]:
    """The text and finish reason of one choice, streamed or not, over plain HTTP."""
    reply = httpx.post(f"{served.url}{path}", json=body, timeout=60)
    if not body.get("stream"):
        choice = reply.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    events = [json.loads(line[6:]) for line in reply.text.splitlines()
              if line.startswith("data: {")]
    return ("".join(e["choices"][0]["text"] for e in events),
            events[-1]["choices"][0]["finish_reason"])


def test_the_served_model_tells_positions_apart(served):
    """The texts below would differ if the server fed a token one RoPE position off."""
    for prompt in ("Once upon a time", "The dog"):
        ids = prompt_ids(served.tok, [prompt])[0]
        out = generate(served.model, torch.tensor([ids]), max_new_tokens=20)
        assert tiny_run.shifted_greedy(served.model, ids, 20) != out[0, len(ids):].tolist()


def test_requests_sharing_steps_get_generates_text_streamed_or_not(served):
    """Completions and stories, streamed and not, sent at once so they decode batched
    (and join while others run): each the text ``generate`` writes for it alone."""
    story = {"summary": "A cat finds a hat.", "words": "hat"}
    work = [("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 24}),
            ("/v1/completions", {"prompt": "The dog", "max_tokens": 30, "stream": True}),
            ("/v1/stories", {**story, "max_tokens": 28, "stream": True}),
            ("/v1/stories", {**story, "max_tokens": 20}),
            ("/v1/completions", {"prompt": "Lily saw a big red", "max_tokens": 26,
                                 "stream": True})]
    with ThreadPoolExecutor(len(work)) as pool:
        replies = list(pool.map(lambda w: post(served, w[0], {**w[1], "temperature": 0}),
                                work))
    for (path, body), (text, _) in zip(work, replies, strict=True):
        prompt = (body["prompt"] if path.endswith("completions")
                  else instruct_prompt(story["summary"], story["words"], None))
        assert text == expected(served, prompt, body["max_tokens"]), body


def test_serve_and_the_generate_command_write_the_same_text(served, capsys):
    """The same checkpoint and prompt at temperature 0: ``generate`` prints the prompt
    and its continuation, the server returns the continuation; both put the end-of-text
    before the prompt."""
    prompt = "Tom had a ball"
    text, _ = post(served, "/v1/completions", {"prompt": prompt, "max_tokens": 24,
                                               "temperature": 0})
    assert main(["generate", "--checkpoint", str(served.checkpoint), "--prompt", prompt,
                 "--max-new-tokens", "24", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + text + "\n"


def test_the_openai_client_gets_greedy_completions(served, client):
    reply = client.completions.create(model="deepseek-mini", prompt="Once upon a time",
                                      max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected(served, "Once upon a time", 12)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == 1 + len(served.tok.encode("Once upon a time"))
    assert 0 < reply.usage.completion_tokens <= 12


def test_the_openai_client_streams_the_same_text(served, client):
    chunks = list(client.completions.create(model="deepseek-mini", prompt="The dog",
                                            max_tokens=20, temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == expected(served, "The dog", 20)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_list_of_prompts_gets_a_choice_each_as_if_alone(served, client):
    prompts = ["Tom had a ball", "Lily saw a big red"]
    reply = client.completions.create(model="deepseek-mini", prompt=prompts, max_tokens=10,
                                      temperature=0)
    texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    assert texts == [expected(served, p, 10) for p in prompts]


def test_a_stop_string_cuts_the_text_before_it(served):
    full = expected(served, "Once upon a time", 20)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    for stream in (False, True):
        body = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0,
                "stop": [stop], "stream": stream}
        reply = httpx.post(f"{served.url}/v1/completions", json=body, timeout=60)
        if stream:
            events = [json.loads(line[6:]) for line in reply.text.splitlines()
                      if line.startswith("data: {")]
            text = "".join(e["choices"][0]["text"] for e in events)
            finish = events[-1]["choices"][0]["finish_reason"]
            assert reply.text.rstrip().endswith("data: [DONE]")
        else:
            text = reply.json()["choices"][0]["text"]
            finish = reply.json()["choices"][0]["finish_reason"]
        assert text == full[:full.index(stop)] and finish == "stop"


def test_stories_use_the_instruct_prompt(served):
    body = {"summary": "A cat finds a hat.", "words": "hat", "max_tokens": 10,
            "temperature": 0}
    reply = httpx.post(f"{served.url}/v1/stories", json=body, timeout=60).json()
    prompt = instruct_prompt("A cat finds a hat.", "hat", None)
    assert reply["choices"][0]["text"] == expected(served, prompt, 10)


@pytest.mark.parametrize("body, status, param, message", [
    ("", 400, None, "the request body is empty"),
    ("{nope", 400, None, "not valid JSON"),
    ("[1, 2]", 400, None, "must be a JSON object"),
    ({"max_tokens": 4}, 400, "prompt", "prompt must be a string"),
    ({"prompt": 5}, 400, "prompt", "prompt must be a string"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "max_tokens must be >= 0"),
    ({"prompt": "a", "max_tokens": "9"}, 400, "max_tokens", "max_tokens must be an integer"),
    ({"prompt": "a", "temperature": -0.1}, 400, "temperature", "temperature must be >= 0"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p", "top_p must be in (0, 1]"),
    ({"prompt": "a", "top_k": 0}, 400, "top_k", "top_k must be >= 1"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream", "stream must be true or false"),
    ({"prompt": "a", "stop": 3}, 400, "stop", "stop must be"),
    ({"prompt": "a", "n": 2}, 400, "n", "n must be 1"),
    ({"prompt": "a " * 1500}, 400, "prompt", "the model reads at most 1024"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model", "model 'gpt-4' does not exist"),
    ('{"prompt": "a\\ud800b"}', 400, "prompt", "holds a lone UTF-16 surrogate"),
    ("[" * 100_000 + "]" * 100_000, 400, None, "nested too deeply"),
    ({"prompt": "a", "seed": 2**70}, 400, "seed", "seed must be a 64-bit integer"),
    ('{"prompt": "a", "temperature": NaN}', 400, "temperature", "must be a finite number"),
    ('{"prompt": "a", "top_p": Infinity}', 400, "top_p", "must be a finite number"),
    # they overflowed in the engine: 200 with empty text and finish_reason "error"
    ({"prompt": "a", "temperature": 1e-320}, 400, "temperature",
     "temperature must be 0 (greedy) or at least 0.0001"),
    ({"prompt": "a", "top_p": 1e-300}, 400, "top_p", "top_p must be at least 1e-06"),
    ({"prompt": ["a"] * 65}, 400, "prompt", "a list of 65 prompts; this server takes at most 64"),
])
def test_bad_requests_get_an_openai_error_naming_the_field(served, body, status, param,
                                                           message):
    content = body if isinstance(body, str) else json.dumps(body)
    reply = httpx.post(f"{served.url}/v1/completions", content=content, timeout=60)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(served):
    """A 20 MB prompt was read, parsed and tokenised (14 s) before its 400."""
    big = json.dumps({"prompt": "a " * (1 << 20)})
    reply = httpx.post(f"{served.url}/v1/completions", content=big, timeout=60)
    assert reply.status_code == 413
    error = reply.json()["error"]
    assert error["code"] == "request_too_large" and "at most 1,048,576" in error["message"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(40):
            yield b"x" * (64 << 10)

    reply = httpx.post(f"{served.url}/v1/completions", content=chunks(), timeout=60)
    assert reply.status_code == 413 and "over 1,048,576 bytes" in reply.json()["error"]["message"]


def test_limits_are_the_servers_to_set(tmp_path):
    from fastapi.testclient import TestClient

    from deepseek_mini.inference.batcher import Batcher
    from deepseek_mini.inference.loading import load_for_inference
    from deepseek_mini.serve.app import create_app
    from deepseek_mini.serve.params import Limits

    model, tok, _ = load_for_inference(serving.tiny_checkpoint(tmp_path))
    batcher = Batcher(model, tok.eos_id, 2)
    app = TestClient(create_app(batcher, tok, "m", Limits(max_body_bytes=100, max_prompts=2)))
    reply = app.post("/v1/completions", json={"prompt": ["a", "b", "c"]})
    assert reply.status_code == 400 and "at most 2 in one request" in reply.text
    reply = app.post("/v1/completions", json={"prompt": "a" * 200})
    assert reply.status_code == 413 and "at most 100" in reply.text


def test_a_long_tokenisation_does_not_stall_other_requests(served, monkeypatch):
    """Prompts were tokenised on the event loop: /health waited 13 s on a 20 MB one."""
    from deepseek_mini.serve import app as app_module

    real = app_module.prompt_ids

    def slow(tok, prompts):
        time.sleep(3.0)
        return real(tok, prompts)

    monkeypatch.setattr(app_module, "prompt_ids", slow)
    done = []
    worker = threading.Thread(target=lambda: done.append(httpx.post(
        f"{served.url}/v1/completions", json={"prompt": "Once", "max_tokens": 1}, timeout=60)))
    worker.start()
    time.sleep(0.5)  # the completion is tokenising now
    started = time.monotonic()
    health = httpx.get(f"{served.url}/health", timeout=60)
    waited = time.monotonic() - started
    worker.join(60)
    assert health.status_code == 200 and waited < 1.5, waited
    assert done and done[0].status_code == 200


def test_the_openai_client_raises_on_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.completions.create(model="deepseek-mini", prompt="a", temperature=-1)


def deliveries(served, monkeypatch) -> list:
    """Every event the batcher delivers from now on, in order (a spy on its submit)."""
    seen = []
    submit = served.batcher.submit

    def spy(request):
        deliver = request.deliver
        request.deliver = lambda event: (seen.append(event), deliver(event))
        submit(request)

    monkeypatch.setattr(served.batcher, "submit", spy)
    return seen


def assert_cancelled_and_freed(served, seen: list, deadline: float, poll: float) -> None:
    """The request whose events are ``seen`` ends cancelled long before its 1000 tokens,
    and its row leaves the batch, by ``deadline`` (monotonic seconds)."""
    while not isinstance(seen[-1], Finish) and time.monotonic() < deadline:
        time.sleep(poll)
    assert seen[-1] == Finish("cancelled") and len(seen) < 1000
    while served.batcher.running and time.monotonic() < deadline:
        time.sleep(poll)  # the row goes right after its last delivery
    assert served.batcher.running == 0


def test_a_client_leaving_mid_stream_frees_its_row(served, monkeypatch):
    seen = deliveries(served, monkeypatch)
    body = {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 1.0,
            "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as reply:
        next(reply.iter_lines())
    assert_cancelled_and_freed(served, seen, time.monotonic() + 30, poll=0.05)


def test_a_client_leaving_before_the_reply_frees_its_row(served, monkeypatch):
    seen = deliveries(served, monkeypatch)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 1.0,
                       "seed": 3}).encode()
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    # closed: the reply, sent in one piece, would go nowhere
    assert_cancelled_and_freed(served, seen, deadline, poll=0.01)


def test_models_health_and_the_page(served, client):
    assert [m.id for m in client.models.list()] == ["deepseek-mini"]
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4
    page = httpx.get(f"{served.url}/").text
    assert 'id="summary"' in page and "/v1/stories" in page


def test_the_command_listens_on_localhost_by_default_and_says_so(served):
    proc = start_cli("serve", "--checkpoint", str(served.checkpoint), "--port", "0", text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving deepseek-mini on http://127.0.0.1:"), proc.stderr.read()
        assert "local only" in line
        url = line.split()[3]
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_command_reports_bad_arguments_in_one_line(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.pt" in err and len(err.splitlines()) == 1
    assert main(["serve", "--checkpoint", "x", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
