// Batches redraws into animation frames, at most one per MIN_FRAME_MS, and none while the tab is hidden.

export const MIN_FRAME_MS = 100;

export class FrameScheduler {
  constructor(draw) {
    this.draw = draw;
    this.dirty = false;
    this.scheduled = false;
    this.lastFrameAt = -Infinity;
    this.frames = 0;
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.dirty) this.request();
    });
  }

  // Asks for a redraw. Many calls between two frames cost one draw.
  request() {
    this.dirty = true;
    if (this.scheduled || document.hidden) return;
    this.scheduled = true;
    const waitMs = Math.max(0, this.lastFrameAt + MIN_FRAME_MS - performance.now());
    setTimeout(() => requestAnimationFrame(() => this.frame()), waitMs);
  }

  frame() {
    this.scheduled = false;
    // A frame that lands after the tab was hidden stays pending until it is visible again.
    if (document.hidden) return;
    this.lastFrameAt = performance.now();
    this.dirty = false;
    this.frames += 1;
    this.draw();
  }
}
