"""Take the README's two explorer screenshots with headless Chromium (Debian's chromium + chromium-driver).

    attnkit translate train --out runs/demo                                   # the demo (additive attention)
    attnkit translate train --model transformer --epochs 4 --out runs/demo-transformer
    python docs/explorer_screenshots.py runs/demo runs/demo-transformer       # -> docs/explorer_*.png

The head view is the demo's first held-out sentence with "march" hovered; the model view is the Transformer's
encoder self-attention, every layer x head.
"""

from __future__ import annotations

import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

DOCS = Path(__file__).resolve().parent


def main(demo: str, transformer: str) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        def open_page(run: str) -> None:
            driver.get((Path(run) / "attention.html").resolve().as_uri())
            WebDriverWait(driver, 20).until(lambda d: d.execute_script("return window.__attnkitReady === true"))

        open_page(demo)
        driver.set_window_size(900, 440)
        keys = driver.find_elements(By.CSS_SELECTOR, "#hv-cols .tok")
        march = next(k for k in keys if k.text == "march")
        ActionChains(driver).move_to_element(march).perform()
        driver.save_screenshot(str(DOCS / "explorer_head_view.png"))
        driver.set_window_size(900, 720)
        open_page(transformer)
        Select(driver.find_element(By.ID, "kind")).select_by_visible_text("encoder self")
        driver.find_element(By.ID, "tab-model").click()
        driver.save_screenshot(str(DOCS / "explorer_model_view.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    main(*sys.argv[1:3])
