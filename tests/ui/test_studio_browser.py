"""The studio as a person uses it: JupyterLab in a real (headless) Chromium at 1280x800.

Each test opens a notebook by its URL (in a workspace of its own, so nothing else is open),
runs every cell from the Run menu, and then looks at what is on the screen: the panels render
as widgets (not "Error displaying widget", not stuck on "Loading widget..."), no output shows
a traceback, a value typed into the panel reaches the kernel, Generate clicked in the browser
runs in the worker thread while the bars move on the page, ends with full green bars and a
``<video>`` that the browser can play; the layout panel's table has rows (notebook 03); the
load panel loads a mode picked in the page (notebook 01). Screenshots of the final state go to
``docs/screenshots/``. About a minute in all on 2 CPU cores.

Run with ``python -m pytest -m ui tests/ui`` (Debian's chromium, ``pip install -e '.[studio,ui]'``).
"""

from __future__ import annotations

import re
import time

import pytest

pytestmark = [pytest.mark.ui, pytest.mark.timeout(900)]

RUN_ALL_TIMEOUT = 420_000  # ms for Run All (about 15 s on 2 CPU cores)
GENERATE_TIMEOUT = 300_000  # ms for one Generate on the tiny preset (a few seconds)
WIDGET_FAILURES = ("Error displaying widget", "Loading widget...", "Error rendering output")
MAX_SHOT = 4000  # px: the tallest viewport used to photograph a whole panel
BROWSER_STEPS = 8  # typed into the panel's steps field in the browser (the notebook leaves 2)
IDLE = re.compile(r"\| Idle$")

# Records every change of the panel's progress line and bars, with whether Generate was
# disabled at that moment: proof that updates made in the worker thread reach the page *while*
# the run goes on, not only when it ends.
WATCH_PROGRESS = """panel => {
    window.__progress = [];
    const generate = [...panel.querySelectorAll('button')].find(b => b.innerText.trim() === 'Generate');
    const snap = () => {
        const bars = [...panel.querySelectorAll('.widget-hprogress .progress-bar')].map(b => b.style.width);
        const line = [...panel.querySelectorAll('.widget-html')].map(h => h.innerText)
            .find(t => /^clip \\d+ of \\d+/.test(t)) || '';
        const last = window.__progress[window.__progress.length - 1];
        const key = line + '|' + bars.join(',');
        if (!last || last.key !== key) window.__progress.push({key, line, bars, running: generate.disabled});
    };
    new MutationObserver(snap).observe(panel, {subtree: true, childList: true, characterData: true,
                                                attributes: true, attributeFilter: ['style', 'disabled']});
}"""


def open_notebook(page, lab, name: str, workspace: str) -> None:
    page.goto(lab.lab_url(name, workspace=workspace))
    page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
    # the kernel has started and is idle (the status bar says so, as a person sees it)
    page.locator(".jp-StatusBar-TextItem", has_text=IDLE).wait_for(timeout=90_000)
    assert page.locator(".jp-NotebookPanel").count() == 1, "another document is open"


def run_all_cells(page) -> None:
    """Run > Run All Cells, then wait until every code cell has an execution count and the
    kernel is idle again."""
    page.locator(".jp-NotebookPanel .jp-Notebook").click(position={"x": 5, "y": 5})  # focus it
    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
            return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p.textContent.trim()));
        }""",
        timeout=RUN_ALL_TIMEOUT,
        polling=1000,
    )
    page.locator(".jp-StatusBar-TextItem", has_text=IDLE).wait_for(timeout=60_000)


def assert_outputs_clean(page, name: str) -> None:
    """No traceback in any output, no widget that failed to render."""
    errors = page.eval_on_selector_all(
        ".jp-Notebook .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
        "els => els.map(e => e.innerText)",
    )
    tracebacks = [e for e in errors if "Traceback" in e or "Error" in e]
    assert not tracebacks, f"{name}: error output in the notebook:\n" + "\n---\n".join(tracebacks)
    text = page.locator(".jp-NotebookPanel .jp-Notebook").inner_text()
    for failure in WIDGET_FAILURES:
        assert failure not in text, f"{name}: the page shows {failure!r}"


def assert_fits(panel) -> None:
    """Nothing in the panel sticks out of it to the right (at 1280 px the output area is ~850 px)."""
    right = panel.evaluate("""el => {
        let right = 0;  // of what is drawn: a scrolling box clips what it holds
        for (const c of el.querySelectorAll('*')) {
            if (!c.offsetParent) continue;
            let r = c.getBoundingClientRect().right;
            for (let a = c.parentElement; a && a !== el; a = a.parentElement)
                if (getComputedStyle(a).overflowX !== 'visible') r = Math.min(r, a.getBoundingClientRect().right);
            right = Math.max(right, r);
        }
        return right;
    }""")
    box = panel.bounding_box()
    assert right <= box["x"] + box["width"] + 1, f"a control sticks out of the panel: {right} > {box}"


def screenshot_panel(page, panel, path) -> None:
    """The whole panel at 1280 px wide: a viewport tall enough for it (JupyterLab scrolls
    inside its own box, so a page-sized shot would cut the panel), then back to 1280x800."""
    viewport = page.viewport_size
    height = min(MAX_SHOT, int(panel.bounding_box()["height"]) + 300)  # + menu, toolbar, status bar
    page.set_viewport_size({"width": viewport["width"], "height": max(height, viewport["height"])})
    try:
        panel.scroll_into_view_if_needed()
        page.wait_for_timeout(500)  # let JupyterLab lay the notebook out again
        panel.screenshot(path=path, animations="disabled")
    finally:
        page.set_viewport_size(viewport)
        page.wait_for_timeout(300)


def bar_fraction(bar) -> float:
    """How full an ipywidgets progress bar is drawn (0..1)."""
    return bar.evaluate("""el => {
        const inner = el.querySelector('.progress-bar');
        const outer = inner.parentElement.getBoundingClientRect();
        return outer.width ? inner.getBoundingClientRect().width / outer.width : 0;
    }""")


def type_into_slider(slider, value: int) -> None:
    """Type a number into an ipywidgets slider's readout, as a person edits it."""
    readout = slider.locator(".widget-readout")
    readout.click()
    readout.press("Control+a")
    readout.type(str(value))
    readout.press("Enter")


def test_generate_panel_in_jupyterlab(jupyter_lab, page, screenshots):
    t0 = time.monotonic()
    open_notebook(page, jupyter_lab, "02_infinitetalk.ipynb", "generate")
    run_all_cells(page)
    ran = time.monotonic() - t0
    assert_outputs_clean(page, "02_infinitetalk.ipynb")

    panel = page.locator(".wanstudio-generate-panel")
    assert panel.count() == 1, "the generate panel did not render as a widget"
    panel.scroll_into_view_if_needed()
    assert panel.is_visible()
    generate = panel.locator("button", has_text="Generate")  # (the name has the icon's glyph too)
    cancel = panel.locator("button", has_text="Cancel")
    assert generate.is_enabled() and cancel.is_disabled()
    for label in (
        "image or video",
        "speech (speaker 1)",
        "speakers",
        "prompt",
        "negative prompt",
        "size class",
        "steps",
        "output mp4",
    ):
        assert panel.locator(
            ".widget-label", has_text=re.compile(f"^{re.escape(label)}$")
        ).first.is_visible(), label
    assert panel.get_by_text("use the pipeline's own size, 64x64").is_visible()
    # the notebook's own quick run (Generate clicked from Python, drawn by the worker thread)
    text = panel.inner_text()
    assert "Done in" in text and "64x64" in text, text
    assert_fits(panel)

    panel.locator("video").evaluate_all("els => els.forEach(e => e.dataset.wanstudioOld = '1')")
    steps = panel.locator(".widget-hslider", has=page.locator(".widget-label", has_text="steps"))
    type_into_slider(steps, BROWSER_STEPS)
    assert steps.locator(".widget-readout").inner_text().strip() == str(BROWSER_STEPS)
    screenshot_panel(page, panel, screenshots / "generate_before.png")

    # --- Generate, clicked as a person clicks it
    panel.evaluate(WATCH_PROGRESS)
    generate.click()
    # the click returns at once (the run is in a worker thread): the page shows it running
    page.wait_for_function("el => !el.disabled", arg=cancel.element_handle(), timeout=30_000)
    assert generate.is_disabled()
    # the browser's steps value reached the kernel: the worker announces it
    panel.get_by_text(f"of {BROWSER_STEPS} steps each").wait_for(timeout=GENERATE_TIMEOUT)
    page.wait_for_function(
        f"el => el.disabled && [...document.querySelectorAll('.wanstudio-generate-panel .widget-html')]"
        f".some(h => /^clip \\d+ of \\d+, step [1-9]\\d* of {BROWSER_STEPS}/.test(h.innerText))",
        arg=generate.element_handle(),
        timeout=GENERATE_TIMEOUT,
        polling=100,
    )
    page.screenshot(path=screenshots / "generate_running.png")  # the 1280x800 view mid-run

    # --- finished: Generate enabled again, full green bars, status Done, a new playable <video>
    page.wait_for_function(
        "el => !el.disabled", arg=generate.element_handle(), timeout=GENERATE_TIMEOUT, polling=200
    )
    text = panel.inner_text()
    assert "Done in" in text and "Generation failed" not in text, text
    assert cancel.is_disabled()
    bars = panel.locator(".widget-hprogress")
    assert bars.count() == 2
    for i in range(2):
        assert bar_fraction(bars.nth(i)) > 0.99, f"progress bar {i} is not full"
        assert bars.nth(i).locator(".progress-bar-success").count() == 1, bars.nth(i).inner_html()
    seen = page.evaluate("window.__progress")
    during = [s for s in seen if s["running"]]
    assert len(during) >= 3, f"the page saw too few progress updates while the run went on: {seen}"
    assert any(0 < float(s["bars"][1].rstrip("%") or 0) < 100 for s in during), seen  # a part-full bar

    video = panel.locator("video:not([data-wanstudio-old])")
    video.wait_for(state="attached", timeout=30_000)
    assert video.count() == 1
    duration = video.evaluate("""v => new Promise(resolve => {
        if (v.readyState >= 1) return resolve(v.duration);
        v.addEventListener('loadedmetadata', () => resolve(v.duration), {once: true});
        v.addEventListener('error', () => resolve(-1), {once: true});
        setTimeout(() => resolve(v.duration), 20000);
    })""")
    error = video.evaluate("v => v.error && v.error.code")
    assert duration and duration > 0, f"the video does not play: duration {duration}, media error {error}"
    width, height, shown_w, shown_h = video.evaluate(
        "v => [v.videoWidth, v.videoHeight, v.clientWidth, v.clientHeight]"
    )
    assert width > 0 and height > 0
    assert shown_w >= 320 and shown_h >= 240, f"the video is drawn {shown_w}x{shown_h}: too small to see"
    video.scroll_into_view_if_needed()
    assert video.is_visible()
    assert_outputs_clean(page, "02_infinitetalk.ipynb")
    assert_fits(panel)
    screenshot_panel(page, panel, screenshots / "generate_after.png")
    print(
        f"\n02: Run All {ran:.0f} s; Generate in the browser: {len(during)} progress updates seen while "
        f"running; a {duration:.2f} s {width}x{height} video drawn {shown_w}x{shown_h}; "
        f"{time.monotonic() - t0:.0f} s in all"
    )


def test_layout_panel_in_jupyterlab(jupyter_lab, page, screenshots):
    t0 = time.monotonic()
    open_notebook(page, jupyter_lab, "03_debug_contiguity.ipynb", "layout")
    run_all_cells(page)
    assert_outputs_clean(page, "03_debug_contiguity.ipynb")
    panel = page.locator(".wanstudio-layout-panel")
    assert panel.count() == 1, "the layout panel did not render as a widget"
    table = panel.locator("table")
    table.wait_for(timeout=30_000)
    headers = table.locator("thead th").all_inner_texts()
    assert len(headers) >= 5, headers
    rows = table.locator("tbody tr")
    assert rows.count() > 10, rows.count()
    first = rows.first.locator("td").all_inner_texts()
    assert len(first) == len(headers) and all(cell.strip() for cell in first[:2]), (headers, first)
    text = panel.inner_text()
    assert re.search(r"\d+ of \d+ rows shown", text), text
    assert panel.get_by_role("button", name="Inspect").is_visible()
    # the block-swap timeline (the notebook turns swap on) is drawn as an image
    timeline = panel.locator("img")
    assert timeline.count() == 1 and timeline.evaluate("i => i.naturalWidth") > 0
    panel.scroll_into_view_if_needed()
    assert table.is_visible() and rows.first.is_visible()
    # one line per row (shapes and strides are not wrapped into three-line cells)
    heights = rows.evaluate_all("rs => rs.slice(0, 20).map(r => r.getBoundingClientRect().height)")
    assert max(heights) < 30, f"table rows are {max(heights):.0f} px tall"
    assert_fits(panel)
    screenshot_panel(page, panel, screenshots / "layout_table.png")
    print(f"\n03: {rows.count()} table rows x {len(headers)} columns; {time.monotonic() - t0:.0f} s in all")


def test_load_panel_in_jupyterlab(jupyter_lab, page, screenshots):
    t0 = time.monotonic()
    open_notebook(page, jupyter_lab, "01_load_and_quantize.ipynb", "load")
    run_all_cells(page)
    assert_outputs_clean(page, "01_load_and_quantize.ipynb")
    panel = page.locator(".wanstudio-load-panel")
    assert panel.count() == 1, "the load panel did not render as a widget"
    panel.scroll_into_view_if_needed()
    # the notebook's last cell loaded fp8_e4m3fn_scaled through the panel; the page shows it
    assert (
        panel.locator("select", has=page.locator("option:checked", has_text="fp8_e4m3fn_scaled")).count() == 1
    )
    text = panel.inner_text()
    assert "Loaded tiny-infinitetalk in" in text, text
    # Load, clicked in the browser, with a mode picked in the browser
    quantization = panel.locator(
        ".widget-dropdown", has=page.locator(".widget-label", has_text="quantization")
    )
    quantization.locator("select").select_option("fp4_scaled")
    load = panel.locator("button", has_text="Load")
    assert load.is_enabled()
    page.evaluate(
        "el => { el.dataset.before = el.innerText }",
        panel.locator(".wanstudio-status").first.element_handle(),
    )
    load.click()
    page.wait_for_function(
        "el => /Loaded tiny-infinitetalk in/.test(el.innerText) && /fp4_scaled/.test(el.innerText)"
        " && !el.querySelector('.wanstudio-busy')",
        arg=panel.element_handle(),
        timeout=120_000,
        polling=200,
    )
    page.wait_for_function("el => !el.disabled", arg=load.element_handle(), timeout=30_000)
    assert "Load failed" not in panel.inner_text()
    assert_fits(panel)
    screenshot_panel(page, panel, screenshots / "load_panel.png")
    print(f"\n01: {time.monotonic() - t0:.0f} s in all")
