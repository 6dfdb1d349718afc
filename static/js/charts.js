// One uPlot chart per metric name, with every selected model overlaid in its own colour.

import { shortId } from "./format.js";
import { smooth } from "./metrics.js";

// These come first, in this order. Any other reported metric follows alphabetically.
const METRIC_ORDER = ["loss", "learning_rate", "grad_norm", "tokens_per_s"];
const CHART_HEIGHT_PX = 220;
const CARD_PADDING_PX = 10;

export class ChartsView {
  constructor(store, scheduler) {
    this.store = store;
    this.scheduler = scheduler;
    this.container = document.getElementById("charts");
    this.models = []; // selected model ids, in legend order
    this.colors = new Map(); // model id -> CSS colour
    this.smoothing = 0;
    this.xMode = "step";
    this.charts = new Map(); // metric name -> chart entry
    this.rebuildAll = true;
    this.dirtyModels = new Set();
    new ResizeObserver(() => this.resize()).observe(this.container);
  }

  setModels(ids, colors) {
    this.models = ids;
    this.colors = colors;
    this.rebuildAll = true;
    this.scheduler.request();
  }

  setSmoothing(weight) {
    // Smoothing adds one series per model, so crossing zero changes the chart layout.
    if ((weight > 0) !== (this.smoothing > 0)) this.rebuildAll = true;
    this.smoothing = weight;
    for (const id of this.models) this.dirtyModels.add(id);
    this.scheduler.request();
  }

  setXMode(mode) {
    this.xMode = mode;
    this.rebuildAll = true;
    this.scheduler.request();
  }

  resetZoom() {
    for (const entry of this.charts.values()) {
      entry.zoomed = false;
      entry.version = null;
    }
    for (const id of this.models) this.dirtyModels.add(id);
    this.scheduler.request();
  }

  markModel(modelId) {
    if (!this.models.includes(modelId)) return;
    this.dirtyModels.add(modelId);
    this.scheduler.request();
  }

  metricNames() {
    const names = new Set();
    for (const id of this.models) for (const name of this.store.names(id)) names.add(name);
    return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  }

  render() {
    if (typeof uPlot === "undefined") return;
    const names = this.metricNames();
    const changedNames = names.length !== this.charts.size || names.some((name) => !this.charts.has(name));
    if (this.rebuildAll || changedNames) {
      this.syncCharts(names, this.rebuildAll);
      this.rebuildAll = false;
    } else if (this.dirtyModels.size) {
      for (const [name, entry] of this.charts) this.updateChart(name, entry);
    }
    this.dirtyModels.clear();
  }

  // Creates missing charts, drops unused ones, and with `rebuild` recreates all of them.
  syncCharts(names, rebuild) {
    for (const [name, entry] of this.charts) {
      if (rebuild || !names.includes(name)) {
        entry.plot.destroy();
        entry.card.remove();
        this.charts.delete(name);
      }
    }
    for (const name of names) {
      let entry = this.charts.get(name);
      if (!entry) {
        entry = this.createChart(name);
        this.charts.set(name, entry);
      } else {
        this.updateChart(name, entry);
      }
      this.container.appendChild(entry.card); // keeps the cards in metric order
    }
  }

  // Redraws a chart only when one of its series changed, because each redraw repaints the canvas.
  updateChart(name, entry) {
    const version = this.dataVersion(name);
    if (version === entry.version) return;
    entry.version = version;
    entry.plot.setData(this.buildData(name), !entry.zoomed);
  }

  dataVersion(name) {
    const parts = this.models.map((id) => (this.store.series(id, name) || { version: 0 }).version);
    return `${this.smoothing}|${parts.join(",")}`;
  }

  createChart(name) {
    const card = document.createElement("figure");
    card.className = "chart";
    card.dataset.metric = name;
    const title = document.createElement("h3");
    title.textContent = name;
    card.appendChild(title);
    this.container.appendChild(card);

    const entry = { card, plot: null, zoomed: false, version: this.dataVersion(name) };
    const options = {
      width: chartWidth(card),
      height: CHART_HEIGHT_PX,
      scales: { x: { time: this.xMode === "time" } },
      series: [{ label: this.xMode }, ...this.seriesOptions()],
      axes: [{}, { size: 64, values: (plot, splits) => formatTicks(splits) }],
      cursor: { sync: { key: "trainpulse" }, drag: { x: true, y: false, setScale: true } },
      legend: { live: true },
      hooks: {
        // Every change of the x range passes here: drag-zoom, double-click reset and setData.
        setScale: [(plot, key) => {
          if (key === "x") entry.zoomed = isZoomed(plot);
        }],
      },
    };
    entry.plot = new uPlot(options, this.buildData(name), card);
    return entry;
  }

  seriesOptions() {
    const options = [];
    for (const id of this.models) {
      const colour = this.colors.get(id) || "#444";
      const label = shortId(id);
      if (this.smoothing > 0) {
        options.push({ label: `${label} raw`, class: "raw-series", stroke: withAlpha(colour, 0.3), width: 1, spanGaps: true });
        options.push({ label, stroke: colour, width: 2, spanGaps: true });
      } else {
        options.push({ label, stroke: colour, width: 1.5, spanGaps: true });
      }
    }
    return options;
  }

  // Returns uPlot's aligned data: one x array, then each model's raw (and smoothed) values.
  buildData(name) {
    const tables = this.models.map((id) => this.modelTable(id, name));
    if (tables.length === 1) return tables[0];
    if (tables.length === 0) return [[]];
    return uPlot.join(tables);
  }

  modelTable(modelId, name) {
    const series = this.store.series(modelId, name);
    const width = this.smoothing > 0 ? 2 : 1;
    if (!series || !series.length) return [[], ...Array.from({ length: width }, () => [])];
    // Copies, because uPlot keeps the arrays it draws and the store appends to its own.
    let x = (this.xMode === "time" ? series.times : series.steps).slice();
    let values = series.values.slice();
    if (this.xMode === "time" && !isAscending(x)) [x, values] = sortByX(x, values);
    return this.smoothing > 0 ? [x, values, smooth(values, this.smoothing)] : [x, values];
  }

  resize() {
    for (const entry of this.charts.values()) {
      entry.plot.setSize({ width: chartWidth(entry.card), height: CHART_HEIGHT_PX });
    }
  }

  // Test and debugging aid: the number of x positions drawn in a metric's chart.
  pointCount(name) {
    const entry = this.charts.get(name);
    return entry ? entry.plot.data[0].length : 0;
  }
}

function rank(name) {
  const position = METRIC_ORDER.indexOf(name);
  return position === -1 ? METRIC_ORDER.length : position;
}

function chartWidth(card) {
  return Math.max(200, card.clientWidth - CARD_PADDING_PX);
}

// Labels y ticks with enough digits to tell neighbours apart, so 1.5e-3 and 2e-3 differ.
function formatTicks(splits) {
  const step = splits.length > 1 ? Math.abs(splits[1] - splits[0]) : Math.abs(splits[0] || 1);
  const largest = Math.max(...splits.map((value) => Math.abs(value)));
  if (largest !== 0 && (largest < 1e-3 || largest >= 1e6)) {
    const digits = Math.max(0, Math.ceil(Math.log10(largest / step)));
    return splits.map((value) => (value === 0 ? "0" : value.toExponential(Math.min(digits, 6))));
  }
  const decimals = decimalsOf(step);
  return splits.map((value) => value.toFixed(decimals));
}

function decimalsOf(step) {
  for (let decimals = 0; decimals < 10; decimals += 1) {
    const scaled = step * 10 ** decimals;
    if (Math.abs(scaled - Math.round(scaled)) < 1e-6 * Math.max(1, scaled)) return decimals;
  }
  return 10;
}

function isZoomed(plot) {
  const x = plot.data[0];
  if (!x || x.length < 2) return false;
  const first = x[0];
  const last = x[x.length - 1];
  const tolerance = (last - first) * 1e-6;
  const scale = plot.scales.x;
  return scale.min > first + tolerance || scale.max < last - tolerance;
}

function isAscending(values) {
  for (let i = 1; i < values.length; i += 1) if (values[i] < values[i - 1]) return false;
  return true;
}

function sortByX(x, values) {
  const order = x.map((_, i) => i).sort((a, b) => x[a] - x[b]);
  return [order.map((i) => x[i]), order.map((i) => values[i])];
}

function withAlpha(hex, alpha) {
  const value = parseInt(hex.slice(1), 16);
  return `rgba(${(value >> 16) & 255}, ${(value >> 8) & 255}, ${value & 255}, ${alpha})`;
}
