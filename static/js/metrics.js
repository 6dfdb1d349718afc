// Metric points per model and metric name, kept sorted by step with one point per step.
//
// History from GET /models/{id}/metrics and live job.metrics events overlap after a reload or
// a reconnect, so a point for a step that is already stored replaces it instead of adding one.

export class Series {
  constructor() {
    this.steps = [];
    this.times = [];
    this.values = [];
    this.index = new Map(); // step -> position
    this.version = 0;
  }

  get length() {
    return this.steps.length;
  }

  add(step, time, value) {
    const position = this.index.get(step);
    if (position !== undefined) {
      this.values[position] = value;
    } else if (this.steps.length === 0 || step > this.steps[this.steps.length - 1]) {
      this.index.set(step, this.steps.length);
      this.steps.push(step);
      this.times.push(time);
      this.values.push(value);
    } else {
      this.insert(step, time, value);
    }
    this.version += 1;
  }

  insert(step, time, value) {
    let low = 0;
    let high = this.steps.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (this.steps[middle] < step) low = middle + 1;
      else high = middle;
    }
    this.steps.splice(low, 0, step);
    this.times.splice(low, 0, time);
    this.values.splice(low, 0, value);
    for (let i = low; i < this.steps.length; i += 1) this.index.set(this.steps[i], i);
  }
}

export class MetricStore {
  constructor(onChange) {
    this.models = new Map(); // model id -> Map(name -> Series)
    this.onChange = onChange;
  }

  series(modelId, name) {
    const byName = this.models.get(modelId);
    return byName ? byName.get(name) : undefined;
  }

  names(modelId) {
    const byName = this.models.get(modelId);
    return byName ? [...byName.keys()] : [];
  }

  lastStep(modelId) {
    let last = 0;
    for (const series of (this.models.get(modelId) || new Map()).values()) {
      if (series.length) last = Math.max(last, series.steps[series.length - 1]);
    }
    return last;
  }

  // Adds the metrics of one step (a job.metrics event). Non-finite values arrive as null.
  addStep(modelId, step, time, metrics) {
    for (const [name, value] of Object.entries(metrics)) {
      this.ensure(modelId, name).add(step, time, value === null ? null : Number(value));
    }
    this.onChange(modelId);
  }

  // Adds history points from the metrics route: [{step, time, value, min, max}].
  addHistory(modelId, name, points) {
    const series = this.ensure(modelId, name);
    for (const point of points) series.add(point.step, point.time, point.value);
    this.onChange(modelId);
  }

  ensure(modelId, name) {
    let byName = this.models.get(modelId);
    if (!byName) {
      byName = new Map();
      this.models.set(modelId, byName);
    }
    let series = byName.get(name);
    if (!series) {
      series = new Series();
      byName.set(name, series);
    }
    return series;
  }
}

// Exponential moving average with the start-up bias removed, so early points are not pulled to 0.
export function smooth(values, weight) {
  if (weight <= 0) return values;
  const smoothed = new Array(values.length);
  let average = 0;
  let count = 0;
  for (let i = 0; i < values.length; i += 1) {
    const value = values[i];
    if (value === null || !Number.isFinite(value)) {
      smoothed[i] = null;
      continue;
    }
    count += 1;
    average = average * weight + (1 - weight) * value;
    smoothed[i] = average / (1 - weight ** count);
  }
  return smoothed;
}
