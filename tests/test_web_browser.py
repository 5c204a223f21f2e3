"""The chat page in a real headless Chromium (the system's chromium + chromedriver, driven by selenium).

The page talks to a real server (make_app + the one-at-a-time Engine) serving the demo model. One test needs
the model to write HTML: no trained model can be asked for an exact string, so there the real app and worker
serve a stand-in engine whose "generation" is a fixed reply (ScriptedEngine), streamed token by token.
Set ELM_MLX_ARTIFACTS to a folder to keep the screenshots (docs/chat-page.png and docs/chat-page-json.png are such copies).
"""

import functools
import http.server
import json
import os
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from elm_mlx.generation import GenerationResponse  # noqa: E402
from elm_mlx.server import Engine, WebPolicy, make_app  # noqa: E402
from live_server import live_server, request  # noqa: E402

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no system Chromium and chromedriver (Debian: apt-get install chromium chromium-driver; .ci/run installs them)",
)

HOSTILE = """Look: <img src=x onerror="window.pwned=1"> and <script>window.pwned=2</script> **bold**
# <b onclick="window.pwned=3">heading</b>
- item <svg onload="window.pwned=4"></svg>
```html
<iframe src="javascript:window.pwned=5"></iframe>
```
[link](javascript:window.pwned=6) `<a href=x>`"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,860"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    downloads = tmp_path_factory.mktemp("downloads")
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


class Recorder:
    """ASGI wrapper noting each request's method, path, Origin, body and answer status: shows what reached the server."""

    def __init__(self, app):
        self.app, self.seen = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        entry = {"method": scope["method"], "path": scope["path"], "origin": dict(scope["headers"]).get(b"origin", b"").decode()}
        self.seen.append(entry)
        body = bytearray()

        async def reading():
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
                entry["body"] = bytes(body)
            return message

        async def noting(message):
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            await send(message)

        await self.app(scope, reading, noting)


@pytest.fixture(scope="module")
def demo_server(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, "OpenELM-Shakespeare")  # one request at a time: a slot not freed would show
    recorder = Recorder(make_app(engine, max_tokens_limit=512))
    with live_server(recorder) as port:
        yield engine, f"http://127.0.0.1:{port}", recorder.seen


class ScriptedEngine(Engine):
    """The real worker, queue and cancellation, with a fixed reply in place of the model's tokens."""

    def __init__(self, model, tokenizer, pieces):
        super().__init__(model, tokenizer, "scripted")
        self.pieces = pieces

    def _run(self, job):
        stats = dict(logprobs=None, prompt_tokens=len(job.prompt_ids), prompt_tps=0.0, generation_tps=0.0, peak_memory_gb=0.0)
        for n, piece in enumerate(self.pieces, 1):
            if job.cancelled.is_set():
                return
            job.emit(GenerationResponse(text=piece, token=0, generation_tokens=n, **stats))
            time.sleep(0.01)
        job.emit(GenerationResponse(text="", token=None, generation_tokens=len(self.pieces), finish_reason="stop", **stats))


@pytest.fixture(scope="module")
def scripted_server(demo):
    model, tokenizer = demo
    pieces = re.findall(r".{1,3}", HOSTILE, re.DOTALL)  # split inside the tags, as tokens would
    with live_server(make_app(ScriptedEngine(model, tokenizer, pieces))) as port:
        yield f"http://127.0.0.1:{port}"


def wait(driver, condition, timeout=20, message=""):
    # the page re-renders the conversation when an answer ends: an element read mid-swap is simply read again
    ignored = (StaleElementReferenceException, NoSuchElementException, IndexError)
    return WebDriverWait(driver, timeout, poll_frequency=0.02, ignored_exceptions=ignored).until(lambda d: condition(), message)


def answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


def streaming(driver) -> bool:
    return bool(driver.find_elements(By.CSS_SELECTOR, "#messages .message.streaming"))


def set_value(driver, element_id, value):
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1]; e.dispatchEvent(new Event('input'))", element_id, value
    )


def open_page(driver, url):
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")
    driver.get_log("browser")  # starts afresh: what earlier tests logged (a refusal's 400) is theirs
    wait(driver, lambda: driver.find_element(By.ID, "model").text not in ("", "…"), message="the model name did not load")


def say(driver, text):
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def shown_texts(driver):
    """The messages' texts as shown (innerText, blank lines between paragraphs dropped), read in one go."""
    texts = driver.execute_script("return [...document.querySelectorAll('#messages .message .body')].map(e => e.innerText)")
    return [re.sub(r"\n+", "\n", t).strip() for t in texts]


def no_page_errors(driver):
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_conversation_streams_shows_its_stats_and_survives_a_reload(browser, demo_server, tmp_path):
    engine, url, _ = demo_server
    open_page(browser, url)
    assert browser.find_element(By.ID, "model").text == "OpenELM-Shakespeare"
    set_value(browser, "system", "You are a player in a Shakespeare play.")
    set_value(browser, "temperature", "0")
    set_value(browser, "max-tokens", "64")
    say(browser, "ROMEO:")
    # The answer grows while it streams.
    lengths = []
    wait(browser, lambda: answers(browser), message="no answer appeared")
    while streaming(browser):
        lengths.append(
            len(browser.execute_script("const a = document.querySelectorAll('.message.assistant .body'); return a[a.length-1].textContent"))
        )
        time.sleep(0.01)
    grew = sorted(set(n for n in lengths if n))
    assert len(grew) >= 3 and lengths == sorted(lengths), lengths
    # The stats shown are the server's.
    first = engine.finished[-1]
    stats = answers(browser)[-1].find_element(By.CLASS_NAME, "stats").text
    m = re.fullmatch(r"(\d+) tokens · [\d.]+ tok/s · first token [\d.]+ s · prompt (\d+) tokens, (\d+) cached · finish: (\w+)", stats)
    assert m, stats
    assert (int(m[1]), int(m[2]), int(m[3])) == (first["generated_tokens"], first["prompt_tokens"], first["cached_tokens"])
    # The second turn resends the conversation: the worker's cache holds it, and the page says so.
    say(browser, "JULIET:")
    wait(browser, lambda: len(answers(browser)) == 2 and not streaming(browser))
    second = engine.finished[-1]
    stats = answers(browser)[-1].find_element(By.CLASS_NAME, "stats").text
    assert second["cached_tokens"] > 0 and f"prompt {second['prompt_tokens']} tokens, {second['cached_tokens']} cached" in stats, stats
    texts = shown_texts(browser)
    artifacts = Path(os.environ.get("ELM_MLX_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "chat-page.png"))
    # A reload keeps the conversation and the settings.
    browser.refresh()
    wait(browser, lambda: browser.find_element(By.ID, "model").text == "OpenELM-Shakespeare")
    assert shown_texts(browser) == texts
    assert texts[0] == "ROMEO:" and texts[2] == "JULIET:"
    assert browser.find_element(By.CSS_SELECTOR, "#conversations li.active .open").text == "ROMEO:"
    assert browser.find_element(By.ID, "system").get_attribute("value") == "You are a player in a Shakespeare play."
    # Export: the conversation as JSON, with its stats.
    browser.find_element(By.ID, "export").click()
    exported = wait(browser, lambda: [p for p in browser.downloads.glob("*.json")], message="no export downloaded")
    data = json.loads(exported[0].read_text())
    contents = [m["content"] for m in data["conversation"]["messages"]]
    assert [re.sub(r"\n+", "\n", c).strip() for c in contents] == texts  # paragraphs render without blank lines
    assert data["settings"]["system"] == "You are a player in a Shakespeare play." and data["model"] == "OpenELM-Shakespeare"
    # What the page assembled from the stream is the server's answer, to the character (greedy: deterministic).
    body = {"messages": [{"role": "system", "content": data["settings"]["system"]}, {"role": "user", "content": "ROMEO:"}]}
    port = int(url.rsplit(":", 1)[1])
    _, _, reply = request(
        port, "POST", "/v1/chat/completions", {**body, "temperature": 0, "max_tokens": 64}, {"Content-Type": "application/json"}
    )
    assert reply["choices"][0]["message"]["content"] == contents[1]
    # Copy puts the answer's own text (Markdown as written) on the clipboard.
    browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    copy = answers(browser)[0].find_element(By.CLASS_NAME, "copy")
    copy.click()
    wait(browser, lambda: copy.text == "Copied")
    assert (
        browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0]('failed: ' + e))") == contents[1]
    )
    assert data["conversation"]["messages"][3]["stats"]["cached_tokens"] == second["cached_tokens"]
    # New chat starts an empty conversation; the first stays in the list and opens again.
    browser.find_element(By.ID, "new-chat").click()
    assert shown_texts(browser) == [] and len(browser.find_elements(By.CSS_SELECTOR, "#conversations li")) == 2
    say(browser, "HAMLET:")
    wait(browser, lambda: len(answers(browser)) == 1 and not streaming(browser))
    titles = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#conversations li .open")]
    assert titles == ["HAMLET:", "ROMEO:"], titles
    browser.find_elements(By.CSS_SELECTOR, "#conversations li .open")[1].click()
    assert shown_texts(browser) == texts
    no_page_errors(browser)


def test_stop_frees_the_server_at_once_and_busy_and_refusals_are_explained(browser, demo_server):
    engine, url, _ = demo_server
    open_page(browser, url)
    set_value(browser, "max-tokens", "480")  # about 5 s of answer on this machine's CPU
    say(browser, "KING HENRY:")
    wait(browser, lambda: len(answers(browser)[-1].find_element(By.CLASS_NAME, "body").text) > 30)
    jobs = len(engine.finished)
    browser.find_element(By.ID, "stop").click()
    stopped_at = time.time()
    wait(browser, lambda: len(engine.finished) > jobs, timeout=5, message="the server went on generating after Stop")
    assert time.time() - stopped_at < 3
    assert engine.finished[-1]["cancelled"] and engine.finished[-1]["generated_tokens"] < 400, engine.finished[-1]
    wait(browser, lambda: not streaming(browser))
    assert "stopped after" in answers(browser)[-1].find_element(By.CLASS_NAME, "stats").text
    # The next request starts at once (this worker serves one request at a time).
    set_value(browser, "max-tokens", "8")
    asked = time.time()
    say(browser, "QUEEN:")
    wait(browser, lambda: len(answers(browser)) == 2 and not streaming(browser), timeout=10)
    assert time.time() - asked < 5 and not engine.finished[-1]["cancelled"]
    assert answers(browser)[-1].find_element(By.CLASS_NAME, "body").text
    # A busy server: another client holds the only slot; the page says it waits, then answers.
    other = urllib.request.urlopen(
        urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"prompt": "LEAR:", "max_tokens": 400, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
    )
    assert other.readline()  # it is generating
    say(browser, "FOOL:")
    notice = browser.find_element(By.ID, "notice")
    wait(browser, lambda: "busy" in notice.text, timeout=10, message="no busy notice")
    assert "1 answering, 1 waiting" in notice.text, notice.text
    # Stopped while waiting: no empty answer; the question goes back in the box.
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda: not notice.is_displayed() and browser.find_element(By.ID, "prompt").get_attribute("value") == "FOOL:")
    assert len(answers(browser)) == 2 and len(stored_messages(browser)) == 4
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda: "busy" in notice.text, timeout=10, message="no busy notice")
    threading.Thread(target=other.close).start()  # the other client leaves: ours goes on
    wait(browser, lambda: len(answers(browser)) == 3 and not streaming(browser), timeout=10)
    assert not notice.is_displayed()
    # A refused request: the server's own words, and the question is given back for editing.
    set_value(browser, "max-tokens", "500")
    long_prompt = "O Romeo, Romeo, wherefore art thou Romeo? " * 3
    say(browser, long_prompt)
    wait(browser, lambda: notice.is_displayed(), message="no refusal shown")
    body = {
        "model": "OpenELM-Shakespeare",
        "messages": [{"role": m["role"], "content": m["content"]} for m in stored_messages(browser)]
        + [{"role": "user", "content": long_prompt}],
        "max_tokens": 500,
    }
    status, _, refusal = request(int(url.rsplit(":", 1)[1]), "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert status == 400 and refusal["error"]["code"] == "context_length_exceeded"
    assert notice.find_element(By.CLASS_NAME, "detail").text == refusal["error"]["message"]
    assert "no longer fits the model's context" in notice.text
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == long_prompt
    assert len(answers(browser)) == 3


def stored_messages(driver):
    store = json.loads(driver.execute_script("return localStorage.getItem('elm-mlx-chat/v1')"))
    return next(c for c in store["conversations"] if c["id"] == store["current"])["messages"]


def test_model_text_is_shown_as_text_never_as_html(browser, scripted_server):
    open_page(browser, scripted_server)
    say(browser, '<img src=y onerror="window.pwned=3"> say it')
    try:
        wait(
            browser, lambda: answers(browser) and not streaming(browser) and answers(browser)[-1].find_element(By.CLASS_NAME, "stats").text
        )
    except TimeoutException:
        pytest.fail("the scripted answer did not finish")
    answer = answers(browser)[-1].find_element(By.CLASS_NAME, "body")
    # Every tag stays visible as written; only the Markdown subset makes elements, and those hold text.
    parts = [(e.tag_name, e.text) for e in answer.find_elements(By.XPATH, "./*")]
    assert parts == [
        ("p", 'Look: <img src=x onerror="window.pwned=1"> and <script>window.pwned=2</script> bold'),
        ("h3", '<b onclick="window.pwned=3">heading</b>'),
        ("ul", 'item <svg onload="window.pwned=4"></svg>'),
        ("pre", '<iframe src="javascript:window.pwned=5"></iframe>'),
        ("p", "[link](javascript:window.pwned=6) <a href=x>"),
    ], parts
    assert answer.find_element(By.TAG_NAME, "strong").text == "bold"
    assert answer.find_elements(By.CSS_SELECTOR, "p code")[0].text == "<a href=x>"
    messages = browser.find_element(By.ID, "messages")
    hostile_tags = "img, script, iframe, object, svg, a, b, [onclick], [onerror], [onload]"
    assert not messages.find_elements(By.CSS_SELECTOR, hostile_tags)
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user .body")[0].text == '<img src=y onerror="window.pwned=3"> say it'
    assert browser.execute_script("return window.pwned") is None
    browser.refresh()  # and again when rendered from storage
    wait(browser, lambda: len(answers(browser)) == 1)
    assert not browser.find_element(By.ID, "messages").find_elements(By.CSS_SELECTOR, hostile_tags)
    assert browser.execute_script("return window.pwned") is None
    no_page_errors(browser)


@pytest.fixture(scope="module")
def other_site(tmp_path_factory):
    """Another web origin (http://localhost:PORT) serving a plain page: what a site the user visits could run."""
    root = tmp_path_factory.mktemp("site")
    (root / "index.html").write_text("<!doctype html><title>another site</title><p>another site</p>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()


FETCH = """
const [url, init, done] = arguments;
fetch(url, init).then(async r => done({status: r.status, type: r.type, text: r.type === 'opaque' ? null : await r.text()}),
                      e => done({error: String(e)}));
"""


def test_another_site_cannot_use_the_model_unless_allowed(browser, demo_server, other_site, demo):
    """In the browser itself: a page on another origin fires a CORS-"simple" text/plain POST (sent without a preflight;
    its reply is unreadable to the page, but a server that does not check Origin would run it) and a JSON POST (the
    browser asks first with a preflight). Both reach the server, which refuses them: the model never runs.
    With that origin given to --cors-origin, its JSON POST works and the page can read the reply."""
    engine, url, seen = demo_server
    browser.get(other_site + "/")
    jobs, before = len(engine.finished), len(seen)
    body = json.dumps({"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 5})
    simple = {"method": "POST", "mode": "no-cors", "headers": {"Content-Type": "text/plain"}, "body": body}
    assert "error" in browser.execute_async_script(FETCH, url + "/v1/chat/completions", simple)  # opaque, and CORP blocks it
    as_json = {**simple, "mode": "cors", "headers": {"Content-Type": "application/json"}}
    assert "Failed to fetch" in browser.execute_async_script(FETCH, url + "/v1/chat/completions", as_json)["error"]
    reached = [(r["method"], r["origin"], r.get("status")) for r in seen[before:] if r["path"] == "/v1/chat/completions"]
    assert reached == [("POST", other_site, 403), ("OPTIONS", other_site, 403)], reached
    time.sleep(0.2)
    assert len(engine.finished) == jobs and engine.status()["active"] == 0  # the model never ran
    model, tokenizer = demo
    allowed = make_app(ScriptedEngine(model, tokenizer, ["Good ", "morrow."]), web=WebPolicy.make([other_site]))
    with live_server(allowed) as port:
        init = {"method": "POST", "headers": {"Content-Type": "application/json"}, "body": body}
        reply = browser.execute_async_script(FETCH, f"http://127.0.0.1:{port}/v1/chat/completions", init)
        assert reply["status"] == 200 and reply["type"] == "cors", reply
        assert json.loads(reply["text"])["choices"][0]["message"]["content"] == "Good morrow."


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def sent_bodies(seen, since):
    return [json.loads(r["body"]) for r in seen[since:] if r["path"] == "/v1/chat/completions" and r["method"] == "POST"]


def shown_code(driver, n):
    """The text of answer n's JSON code block, exactly (textContent), or None when it is not shown as one."""
    return driver.execute_script(
        "const c = document.querySelectorAll('#messages .message.assistant')[arguments[0]].querySelector('.body > pre.json > code');"
        "return c ? c.textContent : null",
        n,
    )


def test_answer_as_json_follows_the_schema_and_a_refused_schema_is_explained(browser, demo_server, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    engine, url, seen = demo_server
    open_page(browser, url)
    set_value(browser, "max-tokens", "120")
    schema_box, error, notice = (browser.find_element(By.ID, i) for i in ("schema", "schema-error", "notice"))
    assert not schema_box.is_displayed()
    browser.find_element(By.ID, "json-on").click()
    assert schema_box.is_displayed()
    # Not JSON: said at the box; nothing is sent and the message stays to be sent again.
    set_value(browser, "schema", '{"type": "object",')
    since = len(seen)
    say(browser, "Who art thou?")
    wait(browser, lambda: error.is_displayed(), message="no inline message for a schema that is not JSON")
    assert error.text.startswith("The schema is not valid JSON: ") and "invalid" in schema_box.get_attribute("class")
    assert sent_bodies(seen, since) == [] and not answers(browser)
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Who art thou?"
    set_value(browser, "schema", "[1, 2]")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda: "must be a JSON object" in error.text)
    # A schema: sent as OpenAI's json_schema; the streamed answer parses and validates, shown as a code block.
    set_value(browser, "schema", json.dumps(PERSON, indent=2))
    assert not error.is_displayed()  # a shown error goes once the text is fixed
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda: len(answers(browser)) == 1 and not streaming(browser), timeout=60)
    [sent] = sent_bodies(seen, since)
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": PERSON, "strict": True}}
    text = shown_code(browser, 0)
    jsonschema.validate(json.loads(text), PERSON)
    assert text == stored_messages(browser)[1]["content"] and engine.finished[-1]["generated_tokens"] < 120
    assert answers(browser)[0].find_element(By.CLASS_NAME, "stats").text.endswith("finish: stop")
    no_page_errors(browser)
    artifacts = Path(os.environ.get("ELM_MLX_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "chat-page-json.png"))
    # A reload keeps the box (switch and schema) and shows the answer as JSON again.
    browser.refresh()
    wait(browser, lambda: browser.find_element(By.ID, "model").text == "OpenELM-Shakespeare")
    assert browser.find_element(By.ID, "json-on").is_selected()
    assert browser.find_element(By.ID, "schema").get_attribute("value") == json.dumps(PERSON, indent=2)
    assert shown_code(browser, 0) == text
    # JSON the server cannot follow as a schema: the server's 400 in its own words; the question comes back.
    notice = browser.find_element(By.ID, "notice")
    set_value(browser, "schema", '{"type": "strin"}')
    since = len(seen)
    say(browser, "Speak again.")
    wait(browser, lambda: notice.is_displayed(), message="no refusal shown")
    [refused] = sent_bodies(seen, since)
    status, _, reply = request(int(url.rsplit(":", 1)[1]), "POST", "/v1/chat/completions", refused, {"Content-Type": "application/json"})
    assert status == 400 and reply["error"]["param"] == "response_format" and seen[since]["status"] == 400
    assert notice.find_element(By.CLASS_NAME, "detail").text == reply["error"]["message"]
    assert "refused the JSON schema (400)" in notice.text
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Speak again." and len(answers(browser)) == 1
    # The next request works: the empty box asks for any JSON object.
    set_value(browser, "schema", "")
    set_value(browser, "max-tokens", "16")
    since = len(seen)
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda: len(answers(browser)) == 2 and not streaming(browser), timeout=30)
    assert not notice.is_displayed()
    [sent] = sent_bodies(seen, since)
    assert sent["response_format"] == {"type": "json_object"} and seen[since]["status"] == 200
    assert shown_code(browser, 1).startswith("{")
    # Switched off: free text again, rendered as Markdown.
    browser.find_element(By.ID, "json-on").click()
    assert not browser.find_element(By.ID, "schema").is_displayed()
    set_value(browser, "max-tokens", "8")
    since = len(seen)
    say(browser, "Farewell.")
    wait(browser, lambda: len(answers(browser)) == 3 and not streaming(browser), timeout=30)
    [sent] = sent_bodies(seen, since)
    assert "response_format" not in sent and shown_code(browser, 2) is None
