"""The synthetic GUI's tasks in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's
chromium-driver (the driver is built with the browser, so their versions always match, and nothing is downloaded;
Playwright would bring or expect a browser build of its own).

Each episode is an HTML page served on 127.0.0.1 that places the same widgets at the same pixels as gui.py's
screen (448 x 448 CSS px at scale 1), with its own JavaScript for their behaviour. The observation is the page's
screenshot; a click is a pointer event at the coordinates (the browser hit-tests it), typing and keys are key
events; the list scrolls by one row. What the page holds (what is ticked, pressed, typed, chosen) is read from its
DOM, and that is where success comes from. The browser reaches nothing but 127.0.0.1.
"""

from __future__ import annotations

import html
import io
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from .calls import Call
from .gui import SIZE, VISIBLE, GuiEnv, Observation, State, Widget

ROW = 40  # px, a list row (gui.py draws the same)


class Pages(ThreadingHTTPServer):
    """The episode's page at /, on 127.0.0.1 and an ephemeral port."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.page = b""
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.page if self.path == "/" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def find_chromium() -> tuple[str, str]:
    """(the browser, its driver), or an error saying what to install."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise RuntimeError("the browser environment needs Chromium and its driver: apt install chromium "
                           "chromium-driver (and pip install selenium)")  # fmt: skip
    return browser, driver


class BrowserEnv(GuiEnv):
    """The GUI's interface (``reset(seed, template)``, ``step(call)``, ``oracle()``) over a headless Chromium.
    Close it (or use it in a ``with``) to end the browser."""

    def __init__(self, templates=None, headless: bool = True):
        super().__init__(*(() if templates is None else (templates,)))
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        browser, driver = find_chromium()
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in ("--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                     "--force-device-scale-factor=1", f"--window-size={SIZE},{SIZE}", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking", "--disable-sync",
                     "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1", "--font-render-hinting=none",
                     *(["--headless=new"] if headless else [])):  # fmt: skip
            options.add_argument(flag)
        self.pages = Pages()
        self.driver = webdriver.Chrome(options=options, service=Service(driver))
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": SIZE, "height": SIZE, "deviceScaleFactor": 1, "mobile": False})

    def close(self) -> None:
        self.driver.quit()
        self.pages.shutdown()
        self.pages.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # the page is the truth: what gui.py keeps in ``self.state``, read from the DOM
    @property
    def state(self) -> State:
        t = self.driver.execute_script("return truth()")
        return State(checked=set(t["checked"]), pressed=[(p, frozenset(c)) for p, c in t["pressed"]],
                     text=t["text"], focused=t["focused"], submitted=t["submitted"], menu_open=t["menu"],
                     chosen=t["chosen"], offset=t["offset"])  # fmt: skip

    @state.setter
    def state(self, value) -> None:  # GuiEnv.reset starts a State; the page's own starts with the page
        pass

    def visible(self) -> list[Widget]:
        """The widgets the page shows now, where the browser laid them out."""
        return [Widget(w["kind"], w["label"], tuple(w["box"])) for w in self.driver.execute_script("return shown()")]

    def reset(self, seed: int, template: str | None = None) -> Observation:
        self.setup(seed, template)
        self.pages.page = page(self.widgets, self.items, self.menu_items).encode()
        self.driver.get(self.pages.url)
        return self.observe()

    def render(self) -> Image.Image:
        return Image.open(io.BytesIO(self.driver.get_screenshot_as_png())).convert("RGB")

    def step(self, call: Call) -> tuple[Observation, bool, bool]:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.actions.action_builder import ActionBuilder
        from selenium.webdriver.common.keys import Keys

        args, d = call.parsed, self.driver
        if call.name == "done":
            return self.observe("The episode is over."), True, self.success
        if call.name == "click":
            d.execute_script("window.said = 'Nothing there.'")
            actions = ActionBuilder(d)
            actions.pointer_action.move_to_location(int(args["x"] * SIZE / 1000), int(args["y"] * SIZE / 1000))
            actions.pointer_action.click()
            actions.perform()
            text = d.execute_script("return window.said")
        elif call.name == "type":
            focused = self.state.focused
            if focused:
                ActionChains(d).send_keys(args["text"]).perform()
            text = f"Typed '{args['text']}'." if focused else "No text field has the focus."
        elif call.name == "scroll":
            text = d.execute_script("return scrollList(arguments[0])", 1 if args["direction"] == "down" else -1)
        else:  # key
            ActionChains(d).send_keys({"Enter": Keys.ENTER, "Tab": Keys.TAB, "Escape": Keys.ESCAPE}[args["name"]])\
                .perform()
            text = f"Pressed {args['name']}."
        done = self.success
        return self.observe(text), done, done


def page(widgets: list[Widget], items: list[str], menu_items: list[str]) -> str:
    """The HTML of one screen: gui.py's widgets at their pixels, their behaviour in JavaScript."""
    def at(box, extra=""):
        x1, y1, x2, y2 = box
        return f'style="left:{x1}px;top:{y1}px;width:{x2 - x1}px;height:{y2 - y1}px;{extra}"'

    body = []
    for w in widgets:
        label = html.escape(w.label)
        if w.kind == "button":
            body.append(f'<button class="button" data-label="{label}" {at(w.box)}>{label}</button>')
        elif w.kind == "checkbox":
            body.append(f'<label class="check" data-label="{label}" {at(w.box)}><input type="checkbox">'
                        f'<span>{label}</span></label>')
        elif w.kind == "field":
            body.append(f'<input id="field" type="text" placeholder="search" autocomplete="off" {at(w.box)}>')
        elif w.kind == "menu":
            x1, y1, _, y2 = w.box
            entries = "".join(f'<div class="entry" data-label="{html.escape(m)}" {at((0, 34 * i, 140, 34 * i + 34))}>'
                              f"{html.escape(m)}</div>" for i, m in enumerate(menu_items))  # fmt: skip
            body.append(f'<button id="menu" data-label="{label}" {at(w.box)}>{label}</button>'
                        f'<div id="entries" {at((x1, y2, x1 + 140, y2 + 34 * len(menu_items)), "display:none")}>'
                        f"{entries}</div>")
        elif w.kind == "list":
            width = w.box[2] - w.box[0]
            rows = "".join(f'<div class="row" data-label="{html.escape(it)}" {at((0, ROW * i, width, ROW * i + ROW))}>'
                           f"{html.escape(it)}</div>" for i, it in enumerate(items))  # fmt: skip
            body.append(f'<div id="list" {at(w.box)}>{rows}</div>')
    return PAGE.replace("{{BODY}}", "".join(body)).replace("{{VISIBLE}}", str(VISIBLE)).replace(
        "{{ROW}}", str(ROW)).replace("{{ITEMS}}", json.dumps(items))


PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>
html, body { margin: 0; width: 448px; height: 448px; overflow: hidden; background: #f5f5f5;
             font: 18px "DejaVu Sans", sans-serif; }
body > * { position: absolute; box-sizing: border-box; margin: 0; }
.button { background: #3c6edc; color: white; border: 0; font: inherit; }
.button.pressed { background: #1e3c8c; }
.check { display: flex; align-items: center; gap: 10px; }
.check input { width: 22px; height: 22px; margin: 0; }
#field { border: 2px solid #787878; background: white; font: inherit; padding-left: 8px; outline: none; }
#field:focus { border-color: #2828c8; }
#menu { background: #dcdcdc; border: 1px solid #787878; font: inherit; }
#entries, #list { background: white; overflow: hidden; }
#entries { z-index: 2; }
.entry, .row { position: absolute; box-sizing: border-box; border: 1px solid #b4b4b4; background: white;
               padding-left: 10px; display: flex; align-items: center; }
</style></head><body>{{BODY}}<script>
const truthState = {pressed: [], submitted: null, chosen: null, menu: null};
window.said = "Nothing there.";
const list = document.getElementById("list"), entries = document.getElementById("entries");
const menu = document.getElementById("menu"), field = document.getElementById("field");
function checked() { return [...document.querySelectorAll(".check")].filter(c => c.querySelector("input").checked)
                                 .map(c => c.dataset.label); }
function closeMenu() { entries.style.display = "none"; truthState.menu = null; }
document.addEventListener("mousedown", e => { if (!e.target.closest("#entries") && !e.target.closest("#menu")) closeMenu(); });
document.querySelectorAll(".button").forEach(b => b.addEventListener("click", () => {
  truthState.pressed.push([b.dataset.label, checked()]); b.classList.add("pressed");
  window.said = `Pressed ${b.dataset.label}.`; }));
document.querySelectorAll(".check input").forEach(i => i.addEventListener("change", () => {
  const l = i.parentElement.dataset.label; window.said = `'${l}' is ${i.checked ? "ticked" : "unticked"}.`; }));
field.addEventListener("focus", () => { window.said = "The search box has the focus."; });
field.addEventListener("keydown", e => { if (e.key === "Enter") truthState.submitted = field.value; });
document.addEventListener("keydown", e => { if (e.key === "Escape") closeMenu(); });
menu.addEventListener("click", () => { entries.style.display = "block"; truthState.menu = menu.dataset.label;
  window.said = `The ${menu.dataset.label} menu is open.`; });
document.querySelectorAll(".entry, .row").forEach(r => r.addEventListener("click", () => {
  truthState.chosen = r.dataset.label; closeMenu(); window.said = `Chose ${r.dataset.label}.`; }));
function offset() { return Math.round(list.scrollTop / {{ROW}}); }
function scrollList(step) {
  const items = {{ITEMS}}, top = Math.min(Math.max(offset() + step, 0), items.length - {{VISIBLE}});
  list.scrollTop = top * {{ROW}};
  return `The list shows ${items.slice(top, top + {{VISIBLE}}).join(", ")}.`;
}
function truth() {
  return {checked: checked(), pressed: truthState.pressed, text: field.value, submitted: truthState.submitted,
          focused: document.activeElement === field, menu: truthState.menu, chosen: truthState.chosen,
          offset: offset()};
}
function box(el) { const r = el.getBoundingClientRect();
  return [Math.round(r.left), Math.round(r.top), Math.round(r.right), Math.round(r.bottom)]; }
function shown() {
  const out = [];
  document.querySelectorAll(".button").forEach(b => out.push({kind: "button", label: b.dataset.label, box: box(b)}));
  document.querySelectorAll(".check").forEach(c => out.push({kind: "checkbox", label: c.dataset.label, box: box(c)}));
  out.push({kind: "field", label: "search", box: box(field)}, {kind: "menu", label: menu.dataset.label, box: box(menu)});
  const frame = list.getBoundingClientRect();
  document.querySelectorAll(".row").forEach(r => { const b = r.getBoundingClientRect();
    if (b.top >= frame.top - 1 && b.bottom <= frame.bottom + 1) out.push({kind: "item", label: r.dataset.label, box: box(r)}); });
  if (truthState.menu) document.querySelectorAll(".entry").forEach(e => out.push({kind: "item", label: e.dataset.label, box: box(e)}));
  return out;
}
</script></body></html>"""
