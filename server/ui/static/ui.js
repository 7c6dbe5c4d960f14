// The dashboard's only script: an auto-refresh switch (remembered per browser) and table filters.
"use strict";

(() => {
  const box = document.getElementById("autorefresh");
  if (box) {
    const key = "latfarm.autorefresh";
    let timer;
    const arm = () => {
      clearTimeout(timer);
      if (box.checked) timer = setTimeout(() => location.reload(), 10000);
    };
    box.checked = localStorage.getItem(key) === "1";
    box.addEventListener("change", () => {
      localStorage.setItem(key, box.checked ? "1" : "0");
      arm();
    });
    arm();
  }

  for (const input of document.querySelectorAll("input[data-filter]")) {
    const rows = () => document.querySelectorAll(`${input.dataset.filter} tbody tr`);
    input.addEventListener("input", () => {
      const needle = input.value.trim().toLowerCase();
      for (const row of rows()) row.hidden = needle !== "" && !row.textContent.toLowerCase().includes(needle);
    });
  }
})();
