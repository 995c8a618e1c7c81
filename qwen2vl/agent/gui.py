"""A synthetic GUI drawn with PIL, to act in: buttons, checkboxes, a text field, a menu and a list that needs
scrolling. Seeded task templates of one to three steps; success is read from the screen's state, never from what
the model says. Coordinates of ``click`` are the grounding format's [0, 1000) of the screenshot.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from .calls import Call

SIZE = 448  # px, square: 16 x 16 tokens of 28 px
WORDS = ["cat", "dog", "sun", "map", "tea", "box", "car", "pen"]
BUTTONS = ["OK", "Cancel", "Submit", "Save", "Next", "Back"]
OPTIONS = ["remember me", "dark mode", "send news", "auto save"]
MENUS = {"File": ["New", "Open", "Close"], "Edit": ["Copy", "Paste", "Undo"]}
ITEMS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach"]
VISIBLE = 3  # rows of the list shown at once

XY = {"type": "integer", "minimum": 0, "maximum": 999}
TOOLS = [
    {"type": "function", "function": {
        "name": "click", "description": "Click the screen at (x, y), in 0-999 units of its width and height.",
        "parameters": {"type": "object", "properties": {"x": XY, "y": XY}, "required": ["x", "y"]}}},
    {"type": "function", "function": {
        "name": "type", "description": "Type into the focused text box.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}},
    {"type": "function", "function": {
        "name": "scroll", "description": "Scroll the list by one row.",
        "parameters": {"type": "object", "properties": {"direction": {"enum": ["up", "down"]}},
                       "required": ["direction"]}}},
    {"type": "function", "function": {
        "name": "key", "description": "Press a key.",
        "parameters": {"type": "object", "properties": {"name": {"enum": ["Enter", "Tab", "Escape"]}},
                       "required": ["name"]}}},
    {"type": "function", "function": {"name": "done", "description": "End the task.",
                                      "parameters": {"type": "object", "properties": {}, "required": []}}},
]


@dataclass
class Observation:
    """What the agent sees after a reset or a step: the screenshot, a text (what the step did, and what the
    screen shows, as an accessibility tree would tell it), and the task."""

    image: Image.Image | None
    text: str
    task: str = ""


@dataclass
class Widget:
    kind: str  # button | checkbox | field | menu | item | list
    label: str
    box: tuple[int, int, int, int]  # pixels, x1 y1 x2 y2

    def center(self) -> tuple[int, int]:
        """The widget's centre in [0, 1000) units."""
        x1, y1, x2, y2 = self.box
        return (x1 + x2) * 500 // SIZE, (y1 + y2) * 500 // SIZE


@dataclass
class State:
    checked: set[str] = field(default_factory=set)
    pressed: list[tuple[str, frozenset]] = field(default_factory=list)  # (button, what was ticked then)
    text: str = ""
    focused: bool = False
    submitted: str | None = None
    menu_open: str | None = None
    chosen: str | None = None
    offset: int = 0  # first list row shown


TEMPLATES = ("click", "tick_then_press", "type_and_enter", "menu", "scroll_and_click")


class GuiEnv:
    """``reset(seed)`` draws a screen and a task; ``step(call)`` acts and returns (observation, done, success)."""

    tools = TOOLS

    def __init__(self, templates: tuple[str, ...] = TEMPLATES):
        self.templates = templates

    def reset(self, seed: int, template: str | None = None) -> Observation:
        self.setup(seed, template)
        return self.observe()

    def observe(self, said: str = "") -> Observation:
        """The screen now: its screenshot, what the last action did (``said``) and the screen's text."""
        return Observation(self.render(), (said + " " if said else "") + self.describe(), self.task)

    def setup(self, seed: int, template: str | None = None) -> None:
        """The seed's screen (widgets, labels, list) and task, drawn from it alone."""
        rng = random.Random(seed)
        self.template = template or rng.choice(self.templates)
        self.state = State()
        buttons = rng.sample(BUTTONS, 3)
        option = rng.choice(OPTIONS)
        menu = rng.choice(list(MENUS))
        self.items = rng.sample(ITEMS, 6)
        self.widgets = [Widget("button", b, (24 + 136 * i, 380, 144 + 136 * i, 420)) for i, b in enumerate(buttons)]
        self.widgets += [Widget("checkbox", option, (24, 300, 220, 330)),
                         Widget("field", "search", (24, 70, 300, 106)),
                         Widget("menu", menu, (24, 16, 104, 46)),
                         Widget("list", "list", (250, 130, 424, 130 + 40 * VISIBLE))]
        self.menu_items = MENUS[menu]
        word, target = rng.choice(WORDS), rng.choice(buttons)
        if self.template == "click":
            self.goal, task = ("press", target), f"Click {target}"
        elif self.template == "tick_then_press":
            self.goal, task = ("tick_press", option, target), f"Tick '{option}', then press {target}"
        elif self.template == "type_and_enter":
            self.goal, task = ("submit", word), f"Type {word} in the search box and press Enter"
        elif self.template == "menu":
            item = rng.choice(MENUS[menu])
            self.goal, task = ("choose", item), f"Open the {menu} menu and choose {item}"
        else:
            item = self.items[VISIBLE]  # the first row below the visible ones: one scroll away
            self.goal, task = ("choose", item), f"Scroll down the list and click {item}"
        self.task = task

    def describe(self) -> str:
        """The screen's text that the widgets' looks do not give away: the buttons' labels, left to right (an
        accessibility tree would tell them). Read from what is shown."""
        return "Buttons: " + ", ".join(w.label for w in self.visible() if w.kind == "button") + "."

    # ---- truth ----------------------------------------------------------------------------------------------
    @property
    def success(self) -> bool:
        s, g = self.state, self.goal
        if g[0] == "press":
            return [label for label, _ in s.pressed] == [g[1]]
        if g[0] == "tick_press":  # ticked before the press
            return len(s.pressed) == 1 and s.pressed[0][0] == g[2] and g[1] in s.pressed[0][1]
        if g[0] == "submit":
            return s.submitted == g[1]
        return s.chosen == g[1]

    def oracle(self) -> Call:
        """The next right call, read from the truth (proves the environment and the loop apart from a model)."""
        s, g = self.state, self.goal
        at = lambda kind, label=None: next(w for w in self.visible() if w.kind == kind and label in (None, w.label))  # noqa: E731
        click = lambda w: Call("click", '{"x": %d, "y": %d}' % w.center())  # noqa: E731
        if g[0] == "tick_press" and g[1] not in s.checked:
            return click(at("checkbox", g[1]))
        if g[0] in ("press", "tick_press"):
            return click(at("button", g[-1]))
        if g[0] == "submit":
            if not s.focused:
                return click(at("field"))
            return Call("type", '{"text": "%s"}' % g[1]) if s.text != g[1] else Call("key", '{"name": "Enter"}')
        if g[1] in self.menu_items:
            return click(at("item", g[1])) if s.menu_open else click(at("menu"))
        if g[1] not in self.items[s.offset:s.offset + VISIBLE]:
            return Call("scroll", '{"direction": "down"}')
        return click(at("item", g[1]))

    # ---- acting ---------------------------------------------------------------------------------------------
    def visible(self) -> list[Widget]:
        """The widgets on screen now: the list's rows as shown, and the open menu's items."""
        out = [w for w in self.widgets if w.kind != "list"]
        x1, y1, x2, _ = next(w for w in self.widgets if w.kind == "list").box
        out += [Widget("item", it, (x1, y1 + 40 * i, x2, y1 + 40 * i + 40))
                for i, it in enumerate(self.items[self.state.offset:self.state.offset + VISIBLE])]
        if self.state.menu_open:
            out += [Widget("item", it, (24, 46 + 34 * i, 164, 80 + 34 * i)) for i, it in enumerate(self.menu_items)]
        return out

    def step(self, call: Call) -> tuple[Observation, bool, bool]:
        s, args = self.state, call.parsed
        if call.name == "done":
            return self.observe("The episode is over."), True, self.success
        if call.name == "click":
            x, y = args["x"] * SIZE / 1000, args["y"] * SIZE / 1000
            hit = [w for w in self.visible() if w.box[0] <= x < w.box[2] and w.box[1] <= y < w.box[3]]
            hit = hit[-1] if hit else None  # the topmost: an open menu covers what is under it
            s.focused = hit is not None and hit.kind == "field"
            if s.menu_open and (hit is None or hit.kind != "item" or hit.label not in self.menu_items):
                s.menu_open = None  # a click elsewhere closes the menu
            if hit is None:
                text = "Nothing there."
            elif hit.kind == "button":
                s.pressed.append((hit.label, frozenset(s.checked)))
                text = f"Pressed {hit.label}."
            elif hit.kind == "checkbox":
                s.checked ^= {hit.label}
                text = f"'{hit.label}' is {'ticked' if hit.label in s.checked else 'unticked'}."
            elif hit.kind == "menu":
                s.menu_open = hit.label
                text = f"The {hit.label} menu is open."
            elif hit.kind == "item":
                s.chosen, s.menu_open = hit.label, None
                text = f"Chose {hit.label}."
            else:
                text = "The search box has the focus."
        elif call.name == "type":
            if s.focused:
                s.text += args["text"]
            text = f"Typed '{args['text']}'." if s.focused else "No text field has the focus."
        elif call.name == "scroll":
            step = 1 if args["direction"] == "down" else -1
            s.offset = min(max(s.offset + step, 0), len(self.items) - VISIBLE)
            text = f"The list shows {', '.join(self.items[s.offset:s.offset + VISIBLE])}."
        else:  # key
            if args["name"] == "Enter" and s.focused:
                s.submitted = s.text
            elif args["name"] == "Escape":
                s.menu_open = None
            text = f"Pressed {args['name']}."
        done = self.success
        return self.observe(text), done, done

    # ---- drawing --------------------------------------------------------------------------------------------
    def render(self) -> Image.Image:
        img = Image.new("RGB", (SIZE, SIZE), (245, 245, 245))
        d = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=18)
        s = self.state
        for w in self.visible():
            x1, y1, x2, y2 = w.box
            if w.kind == "button":
                d.rectangle(w.box, fill=(30, 60, 140) if any(p == w.label for p, _ in s.pressed) else (60, 110, 220))
                d.text(((x1 + x2) / 2, (y1 + y2) / 2), w.label, fill="white", font=font, anchor="mm")
            elif w.kind == "checkbox":
                d.rectangle((x1, y1 + 4, x1 + 22, y1 + 26), outline="black", width=2)
                if w.label in s.checked:
                    d.line((x1 + 4, y1 + 15, x1 + 10, y1 + 22, x1 + 19, y1 + 7), fill="black", width=3)
                d.text((x1 + 32, y1 + 15), w.label, fill="black", font=font, anchor="lm")
            elif w.kind == "field":
                d.rectangle(w.box, fill="white", outline=(40, 40, 200) if s.focused else (120, 120, 120), width=2)
                d.text((x1 + 8, (y1 + y2) / 2), s.text or "search", fill="black" if s.text else (150, 150, 150),
                       font=font, anchor="lm")
            elif w.kind == "menu":
                d.rectangle(w.box, fill=(220, 220, 220), outline=(120, 120, 120))
                d.text(((x1 + x2) / 2, (y1 + y2) / 2), w.label, fill="black", font=font, anchor="mm")
            else:  # item: a list row or an open menu's entry
                d.rectangle(w.box, fill="white", outline=(180, 180, 180))
                d.text((x1 + 10, (y1 + y2) / 2), w.label, fill="black", font=font, anchor="lm")
        return img
