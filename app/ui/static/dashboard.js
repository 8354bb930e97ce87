// The dashboard's only script of its own: confirmation dialogs for dangerous forms, and uPlot charts drawn from the
// JSON the server renders into each chart's data-spec attribute (not a <script> block: htmx drops those from the
// fragments it swaps in). No inline script anywhere (the Content-Security-Policy forbids it).
"use strict";

const COLORS = ["#4f46e5", "#0891b2", "#c026d3", "#ea580c", "#16a34a"];

// A form with data-confirm asks first, in a <dialog>; confirming submits it for real.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.dataset.confirm || form.dataset.confirmed) return;
  event.preventDefault();
  const dialog = document.getElementById("confirm");
  dialog.querySelector(".confirm-message").textContent = form.dataset.confirm;
  dialog.returnValue = "";
  dialog.addEventListener(
    "close",
    () => {
      if (dialog.returnValue !== "ok") return;
      form.dataset.confirmed = "1";
      form.requestSubmit(event.submitter);
    },
    { once: true },
  );
  dialog.showModal();
});

function drawPlot(element) {
  if (element.dataset.drawn) return;
  element.dataset.drawn = "1";
  const spec = JSON.parse(element.dataset.spec);
  const series = [{ label: spec.x_label }];
  const data = [spec.x];
  for (const line of spec.lines) {
    series.push({
      label: line.label,
      stroke: COLORS[line.color % COLORS.length],
      width: line.dashed ? 1.5 : 2,
      dash: line.dashed ? [6, 4] : undefined,
      points: { show: !line.dashed && spec.x.length <= 40 },
      spanGaps: true,
    });
    data.push(line.values);
  }
  const options = {
    width: Math.max(element.clientWidth, 320),
    height: 240,
    series,
    scales: { x: { time: false } },
    // versions and steps are whole numbers: no ticks between them
    axes: [{ label: spec.x_label, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, {}],
    legend: { live: true },
  };
  element.chart = new uPlot(options, data, element);
}

htmx.onLoad((root) => root.querySelectorAll("[data-spec]").forEach(drawPlot));
