// Training runs: the model list, which models the charts overlay, their history and checkpoints.
//
// The selection lives in the URL fragment (#models=a,b), so a reload or a shared link shows the
// same runs. Without one, the newest model is shown until the user ticks a box.

import { getJson } from "./api.js";
import { formatBytes, shortId } from "./format.js";

// Points requested per metric when history loads. The server downsamples longer runs to this.
export const HISTORY_POINTS = 5000;
const PALETTE = ["#2458d6", "#d6452a", "#17803d", "#9b3fd1", "#c98a00", "#0f8a9d", "#c2357a", "#5d6675"];

export class RunsPanel {
  constructor(store, charts, scheduler) {
    this.store = store;
    this.charts = charts;
    this.scheduler = scheduler;
    this.models = new Map(); // id -> model record
    this.selected = readSelection();
    this.chosenByUser = this.selected.length > 0;
    this.colors = new Map();
    this.historyLoaded = new Set();
    this.checkpoints = new Map(); // id -> checkpoint list
    this.listDirty = true;
    this.checkpointsDirty = true;
    this.list = document.getElementById("runs-list");
    this.empty = document.getElementById("runs-empty");
    this.checkpointBox = document.getElementById("checkpoints");
    window.addEventListener("hashchange", () => this.select(readSelection(), true));
  }

  async reload() {
    const listing = await getJson("/models");
    this.models.clear();
    for (const model of listing.models) this.models.set(model.model_id, model);
    this.historyLoaded.clear();
    if (!this.chosenByUser) this.selected = this.newestModel();
    this.listDirty = true;
    this.applySelection();
    await Promise.all(this.selected.map((id) => this.loadModel(id)));
  }

  addModel(model) {
    this.models.set(model.model_id, model);
    this.listDirty = true;
    if (!this.chosenByUser) {
      this.selected = [model.model_id];
      this.applySelection();
      this.loadModel(model.model_id);
    }
    this.scheduler.request();
  }

  // Notes a live step so the run list shows the current step count.
  noteStep(modelId, step) {
    const model = this.models.get(modelId);
    if (model && step > (model.steps || 0)) {
      model.steps = step;
      this.listDirty = true;
    }
  }

  select(ids, byUser) {
    this.selected = [...new Set(ids)];
    if (byUser) this.chosenByUser = true;
    writeSelection(this.selected);
    this.listDirty = true;
    this.applySelection();
    for (const id of this.selected) this.loadModel(id);
  }

  applySelection() {
    this.assignColours();
    this.charts.setModels([...this.selected], this.colors);
    this.checkpointsDirty = true;
    this.scheduler.request();
  }

  // Loads a model's history once per page state, then its checkpoints.
  async loadModel(id) {
    if (!this.historyLoaded.has(id)) {
      this.historyLoaded.add(id);
      try {
        const { names } = await getJson(`/models/${encodeURIComponent(id)}/metrics`);
        await Promise.all(names.map(async (name) => {
          const query = `name=${encodeURIComponent(name)}&max_points=${HISTORY_POINTS}`;
          const history = await getJson(`/models/${encodeURIComponent(id)}/metrics?${query}`);
          this.store.addHistory(id, name, history.points);
        }));
      } catch (error) {
        this.historyLoaded.delete(id);
        console.warn("trainpulse: could not load the metric history of", id, error);
      }
    }
    await this.loadCheckpoints(id);
  }

  async loadCheckpoints(id) {
    try {
      const model = await getJson(`/models/${encodeURIComponent(id)}`);
      this.checkpoints.set(id, model.checkpoints || []);
      this.models.set(id, { ...this.models.get(id), ...model });
      this.checkpointsDirty = true;
      this.listDirty = true;
      this.scheduler.request();
    } catch (error) {
      console.warn("trainpulse: could not load the checkpoints of", id, error);
    }
  }

  onCheckpointSaved(modelId) {
    if (this.selected.includes(modelId)) this.loadCheckpoints(modelId);
  }

  newestModel() {
    const models = [...this.models.values()].sort((a, b) => b.created_at - a.created_at);
    return models.length ? [models[0].model_id] : [];
  }

  assignColours() {
    // A model keeps its colour while it stays selected, so ticking another does not repaint it.
    for (const id of [...this.colors.keys()]) if (!this.selected.includes(id)) this.colors.delete(id);
    const used = new Set(this.colors.values());
    for (const id of this.selected) {
      if (this.colors.has(id)) continue;
      const colour = PALETTE.find((candidate) => !used.has(candidate)) || PALETTE[this.colors.size % PALETTE.length];
      this.colors.set(id, colour);
      used.add(colour);
    }
  }

  render() {
    if (this.listDirty) {
      this.renderList();
      this.listDirty = false;
    }
    if (this.checkpointsDirty) {
      this.renderCheckpoints();
      this.checkpointsDirty = false;
    }
  }

  renderList() {
    const models = [...this.models.values()].sort((a, b) => b.created_at - a.created_at);
    this.empty.hidden = models.length > 0;
    const items = models.map((model) => {
      const id = model.model_id;
      const item = document.createElement("li");
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = id;
      box.checked = this.selected.includes(id);
      box.addEventListener("change", () => {
        const others = this.selected.filter((other) => other !== id);
        this.select(box.checked ? [...others, id] : others, true);
      });
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = this.colors.get(id) || "transparent";
      const name = document.createElement("span");
      name.className = "run-name";
      name.textContent = shortId(id);
      name.title = id;
      const meta = document.createElement("span");
      meta.className = "run-meta";
      meta.textContent = `${model.base_model} · r${model.lora_rank} · ${model.steps || 0} steps` +
        (model.unloaded ? " · unloaded" : "");
      label.append(box, swatch, name, meta);
      item.appendChild(label);
      return item;
    });
    this.list.replaceChildren(...items);
  }

  renderCheckpoints() {
    const cards = this.selected.filter((id) => this.models.has(id)).map((id) => {
      const card = document.createElement("section");
      card.className = "checkpoint-card";
      card.dataset.modelId = id;
      const title = document.createElement("h3");
      title.textContent = `Checkpoints of ${shortId(id)}`;
      card.appendChild(title);
      const checkpoints = this.checkpoints.get(id) || [];
      if (!checkpoints.length) {
        const none = document.createElement("p");
        none.className = "empty";
        none.textContent = "No checkpoints or sampler weights saved yet.";
        card.appendChild(none);
        return card;
      }
      const list = document.createElement("ul");
      for (const checkpoint of checkpoints) {
        const item = document.createElement("li");
        const kind = document.createElement("span");
        kind.className = "checkpoint-kind";
        kind.textContent = checkpoint.checkpoint_type === "sampler" ? "sampler weights " : "training state ";
        item.append(kind, checkpoint.tinker_path, ` (${formatBytes(checkpoint.size_bytes)})`);
        list.appendChild(item);
      }
      card.appendChild(list);
      return card;
    });
    this.checkpointBox.replaceChildren(...cards);
  }
}

function readSelection() {
  const match = /(?:^|&)models=([^&]*)/.exec(location.hash.slice(1));
  return match ? decodeURIComponent(match[1]).split(",").filter(Boolean) : [];
}

function writeSelection(ids) {
  const hash = ids.length ? `#models=${ids.map(encodeURIComponent).join(",")}` : "";
  if (location.hash !== hash) history.replaceState(null, "", hash || location.pathname);
}
