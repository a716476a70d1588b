"""Opens a Snakemake HTML report in real headless Chromium and checks that its figures show.

The report is a single-page app: its results appear only after navigating its menu (category,
then subcategory, then an entry's "eye" button). `check_report` does that as a user would, for
every category the report has, and for every image entry it opens asserts that the <img> really
decoded (naturalWidth > 0), is displayed with a non-zero size, and that a screenshot of it is not
blank. Every image the report holds must be reached this way, and the `required` ones among them.

Chromium and its WebDriver come from the system (Debian: `chromium`, `chromium-driver`; see
ci/setup-system.sh); Selenium is pointed at that driver, so Selenium Manager downloads nothing.
Without them the check is skipped with a warning, except in CI (CI=true or EGM_CI=1), where it fails.

    python -m tests.report_browser results/report.html [--shots DIR] [--require PATH ...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1920, 1400)
TIMEOUT_S = 60
# A rendered plot has anti-aliased lines and text: many colours, and plenty of non-background.
MIN_COLOURS = 16
MIN_INK = 0.01  # fraction of pixels that differ from the most common colour


class BrowserUnavailable(RuntimeError):
    pass


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) from PATH, or BrowserUnavailable saying what is missing."""
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    missing = [what for what, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (the `test` extra of pyproject.toml)")
    if missing:
        raise BrowserUnavailable(
            f"no {' or '.join(missing)} for the report's browser check "
            "(Debian: apt-get install chromium chromium-driver; ci/setup-system.sh installs them)"
        )
    return browser, driver


def _on_ci() -> bool:
    """CI=true (what CI services set) or EGM_CI=1 (what .ci/run sets)."""
    return (os.environ.get("EGM_CI") == "1"
            or os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"))


def check_report_or_skip(report: Path, **kwargs) -> list[dict] | None:
    """`check_report` for tests: without a browser it warns and returns None (the calling test
    goes on with its other checks), but under CI it fails, so that CI can't skip it silently."""
    import pytest

    try:
        find_browser()
    except BrowserUnavailable as missing:
        if _on_ci():
            pytest.fail(f"CI is set but {missing}")
        warnings.warn(f"report browser check skipped: {missing}", pytest.PytestWarning, stacklevel=2)
        return None
    return check_report(report, **kwargs)


def _driver(browser: str, chromedriver: str, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))


def _wait(driver, script: str, what: str, *args):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.1).until(lambda d: d.execute_script(script, *args))
    except TimeoutException:
        body = driver.execute_script("return document.body ? document.body.innerText : ''")
        raise AssertionError(f"report: timed out waiting for {what}; the page shows:\n{body[:2000]}") from None


def _click_link(driver, text: str):
    """The first visible menu link whose text is `text`."""
    links = [a for a in driver.find_elements("css selector", "a") if a.text.strip() == text and a.is_displayed()]
    if not links:
        body = driver.execute_script("return document.body.innerText")
        raise AssertionError(f"report: no link {text!r} in its menu; the page shows:\n{body[:2000]}")
    links[0].click()


def _blankness(png: bytes) -> tuple[int, float]:
    """(distinct colours, fraction of pixels unlike the most common one) of a PNG screenshot."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=image.width * image.height)
    top = max(count for count, _ in colours)
    return len(colours), 1 - top / (image.width * image.height)


def check_report(report: Path, required: list[str] = (), shots: Path | None = None) -> list[dict]:
    """Opens every image entry of the report at `report` through its menu; returns one record per
    image (path, natural and displayed size, screenshot colours and ink), asserting as it goes."""
    report = Path(report).resolve()
    assert report.is_file() and report.stat().st_size > 0, f"no report at {report}"
    browser, chromedriver = find_browser()
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="egm-report-chromium-") as profile:
        driver = _driver(browser, chromedriver, profile)
        try:
            return _check(driver, report, list(required), shots)
        finally:
            driver.quit()


def _load(driver, report: Path) -> None:
    driver.get(report.as_uri())
    # The app renders into #app once React and the embedded data have loaded.
    _wait(driver, "return typeof app !== 'undefined' && app !== null && typeof categories === 'object'"
                  " && document.querySelector('#app a') !== null", "the report app to render")


def _check(driver, report: Path, required: list[str], shots: Path | None) -> list[dict]:
    _load(driver, report)
    assert driver.title == "Snakemake Report", f"report: page title {driver.title!r}"
    categories = driver.execute_script("return categories")
    images = set(driver.execute_script(
        "return Object.keys(results).filter(p => (results[p].mime_type || '').startsWith('image/'))"))
    missing = sorted(set(required) - images)
    assert not missing, f"report: holds no image {missing}; its images: {sorted(images)}"
    assert images, f"report: no image entries at all (categories: {json.dumps(categories)})"

    seen: dict[str, dict] = {}
    for category, subcategories in categories.items():
        for subcategory in subcategories:
            # A fresh load per (sub)category: the menu starts from the top each time.
            _load(driver, report)
            _click_link(driver, category)
            if len(subcategories) > 1:
                _click_link(driver, subcategory)
            _wait(driver, "return document.querySelectorAll('td div[role=group] > a').length > 0",
                  f"the entries of {category}/{subcategory}")
            for index in range(len(driver.find_elements("css selector", "tr"))):
                # The row's first cell is the entry's path; its "eye" button opens the entry in
                # the page. Only images are opened: a PDF opens in an iframe whose viewer can hold
                # back the page's clicks on a busy machine, and tables are downloads.
                row = driver.find_elements("css selector", "tr")[index]
                cells = row.find_elements("css selector", "td")
                buttons = row.find_elements("css selector", "td div[role=group] > a:first-child")
                if not cells or not buttons or cells[0].text.strip() not in images:
                    continue
                path = _open_entry(driver, buttons[0], cells[0].text.strip())
                seen[path] = _check_image(driver, path, shots)
    unreached = sorted(images - set(seen))
    assert not unreached, f"report: images its menu never showed: {unreached}"
    logs = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
    assert not logs, f"report: errors in the browser console: {logs}"
    return [seen[path] for path in sorted(seen)]


def _open_entry(driver, button, path: str) -> str:
    """Clicks an entry's "eye" button until the app shows that entry: a click that lands while
    the page is still re-rendering is lost, so a few tries are made before failing."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    opened = "return app.state.resultPath === arguments[0] ? arguments[0] : null"
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    for _ in range(3):
        button.click()
        try:
            return WebDriverWait(driver, TIMEOUT_S / 4, poll_frequency=0.1).until(
                lambda d: d.execute_script(opened, path))
        except TimeoutException:
            continue
    return _wait(driver, opened, f"the entry {path} to open", path)


def _check_image(driver, path: str, shots: Path | None) -> dict:
    # The content pane shows <img src=data URI of this entry>; wait until it has decoded.
    state = _wait(driver, """
        const uri = results[arguments[0]].data_uri;
        if (app.state.content !== 'img' || app.state.contentPath !== uri) return null;
        const img = [...document.querySelectorAll('img')].find(i => i.getAttribute('src') === uri);
        if (!img || !img.complete) return null;
        return {img: img, natural: [img.naturalWidth, img.naturalHeight]};""", f"{path} to load", path)
    img, natural = state["img"], state["natural"]
    assert natural[0] > 0 and natural[1] > 0, f"report: {path} did not decode (naturalWidth {natural[0]})"
    assert img.is_displayed(), f"report: {path} is not displayed"
    size = img.size
    assert size["width"] > 0 and size["height"] > 0, f"report: {path} shown at size {size}"
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", img)
    shot = img.screenshot_as_png
    colours, ink = _blankness(shot)
    assert colours >= MIN_COLOURS and ink >= MIN_INK, (
        f"report: the screenshot of {path} looks blank ({colours} colours, {ink:.2%} non-background)")
    if shots:
        name = path.replace("/", "__")
        (Path(shots) / name).write_bytes(shot)
        driver.save_screenshot(str(Path(shots) / f"page__{Path(name).stem}.png"))
    return {"path": path, "natural": natural, "displayed": [size["width"], size["height"]],
            "colours": colours, "ink": round(ink, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--shots", type=Path, help="write each figure's screenshot here")
    parser.add_argument("--require", action="append", default=[], help="an image path the report must show")
    args = parser.parse_args(argv)
    for record in check_report(args.report, required=args.require, shots=args.shots):
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
