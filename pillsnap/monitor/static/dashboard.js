// The dashboard page: one WebSocket to the monitor server, which pushes the run's state whenever the metrics stream
// grows (whole at first, "state", then what changed, "patch": pillsnap/monitor/delta.py) and a machine sample
// ("system") every few seconds; this file only renders them.
"use strict";

const TASKS = {
  classification: {
    label: "Classification", accent: "#58a6ff", valTitle: "Validation (%)",
    metrics: [["acc", "Accuracy", "#3fb950"], ["macro_f1", "Macro-F1", "#58a6ff"], ["top5", "Top-5", "#bc8cff"]],
  },
  detection: {
    label: "Detection", accent: "#ffa657", valTitle: "Validation (%)",
    metrics: [["mAP@0.5", "mAP@0.5", "#ffa657"], ["mAP@0.5:0.95", "mAP@0.5:0.95", "#f778ba"],
              ["precision", "Precision", "#3fb950"], ["recall", "Recall", "#39c5cf"]],
  },
};
const STATUS_TEXT = {waiting: "waiting", running: "running", completed: "completed", early_stopped: "early stop",
                     time_capped: "time cap", oom_emergency_exit: "OOM exit", interrupted: "interrupted", crashed: "crashed",
                     finished: "finished", gone: "stopped", restarting: "restarting"};
const OOM_ACTIONS = {amp_fp16: "switched to fp16 autocast", microbatching: "micro-batching (same global batch)",
                     global_batch_change: "smaller global batch, LR scaled", emergency_exit: "gave up: emergency checkpoint"};
const STALE_AFTER_S = 120;      // no record for this long while running: say so
const HUNG_AFTER_S = 3600;      // this long with the trainer alive: longer than a Stage 4 validation, a hang?
const SERVER_SILENT_S = 10;     // no message from the server for this long: the link is stale

const $ = id => document.getElementById(id);
const esc = text => String(text).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const page = {state: null, system: null, skew: 0, lastMessage: 0, panels: {}, history: {cpu: [], ram: [], gpu: []}};
const serverNow = () => Date.now() / 1000 - page.skew;

// ---------- connection ----------
function connect(attempt = 0) {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  ws.onopen = () => { attempt = 0; page.lastMessage = Date.now(); setConnection("live", "live"); };
  ws.onmessage = event => {
    page.lastMessage = Date.now();
    const msg = JSON.parse(event.data);
    if (msg.kind === "state") onState(msg.data);
    else if (msg.kind === "patch") onPatch(ws, msg.data);
    else if (msg.kind === "system") onSystem(msg.data);
    if ($("connection").dataset.state !== "live") setConnection("live", "live");
  };
  ws.onclose = () => {
    const wait = Math.min(10, 2 ** attempt);
    setConnection("reconnecting", `reconnecting in ${wait} s…`);
    setTimeout(() => connect(attempt + 1), wait * 1000);
  };
}

// A patch from the server (pillsnap/monitor/delta.py): {"=": value} replaces, {"+": items} appends to a list,
// {"~": {key: patch}, "-": [keys]} changes and removes a dict's keys. Applied in place; returns the new value.
// Keys are defined, not assigned: a key named "__proto__" (an evaluation file holds any JSON) is a key like any.
function applyPatch(value, patch) {
  if ("=" in patch) return patch["="];
  if ("+" in patch) { for (const item of patch["+"]) value.push(item); return value; }
  for (const key of patch["-"] || []) delete value[key];
  for (const [key, change] of Object.entries(patch["~"] || {})) {
    const own = Object.prototype.hasOwnProperty.call(value, key) ? value[key] : undefined;
    Object.defineProperty(value, key, {value: applyPatch(own, change), writable: true, enumerable: true,
                                       configurable: true});
  }
  return value;
}

// A patch the page cannot apply (none should be) leaves it out of step with the server for good: the link is
// closed instead, and the reconnect brings the state whole.
function onPatch(ws, patch) {
  let state;
  try {
    state = applyPatch(page.state, patch);
  } catch (err) {
    console.error("dashboard: a patch could not be applied; reconnecting for the whole state", err);
    page.state = null;  // not drawn half-patched meanwhile
    ws.close();
    return;
  }
  onState(state);
}

function setConnection(state, text) {
  const el = $("connection");
  el.dataset.state = state;
  el.querySelector("span").textContent = text;
}

// ---------- state ----------
function onState(state) {
  page.skew = Date.now() / 1000 - state.server_time;
  page.state = state;
  $("exp-name").textContent = "experiment: " + state.exp;
  $("exp-name").title = state.exp_path;
  $("stream-path").textContent = state.stream;
  $("stream-missing").style.display = state.stream_exists ? "none" : "";
  $("foot-stream").textContent = "following " + state.stream;
  $("foot-records").textContent = `${state.records.toLocaleString("en")} records`;
  renderEvaluation(state.evaluation, stoppedShort(state), state.run.after, state.trainer, state.run.after_failed);
  renderOom(state.oom);
  renderTasks(state);
  tick();
}

// Everything that depends on the clock (ages, elapsed, ETA countdown): also re-run every second.
function tick() {
  const s = page.state;
  if (s) {
    renderRun(s);
    for (const [name, panel] of Object.entries(page.panels)) if (s.tasks[name]) renderTaskEta(panel, s.tasks[name]);
  }
  if (page.lastMessage && Date.now() - page.lastMessage > SERVER_SILENT_S * 1000 && $("connection").dataset.state === "live") {
    setConnection("stale", `no word from the server for ${Fmt.dur((Date.now() - page.lastMessage) / 1000)}`);
  }
}

// The stream says "running" but the process that held the folder has ended: killed or crashed, no end record. Or
// torchrun's restart, expected after an end record, has not come within RESTART_GRACE_S (it failed to start).
const RESTART_GRACE_S = 300;
const ended = s => !!s.trainer && s.trainer.alive === false;
const restartOverdue = s => s.run.status === "restarting" && ended(s) && serverNow() - (s.run.ended || 0) > RESTART_GRACE_S;
// Ended without an end record while torchrun has restarts left, lately: how an OOM on another rank ends rank 0
// under NCCL (waiting in a collective until torchrun kills it), before torchrun starts the job again.
const restartMayCome = s => s.run.status === "running" && ended(s) && (s.run.restart || 0) < (s.run.max_restarts || 0) &&
  serverNow() - (s.run.last_time || 0) <= RESTART_GRACE_S;
const trainerGone = s => (s.run.status === "running" && ended(s) && !restartMayCome(s)) || restartOverdue(s);
const isRunning = s => s.run.status === "running" && !ended(s);  // neither gone nor between torchrun's attempts
// A run that stopped before its end: no stage decision comes until a resume finishes it.
const STOPPED_SHORT = ["interrupted", "crashed", "oom_emergency_exit"];
const stoppedShort = s => trainerGone(s) || STOPPED_SHORT.includes(s.run.status);

function renderRun(s) {
  const run = s.run, now = serverNow(), trainer = s.trainer, gone = trainerGone(s);
  const status = $("run-status");
  const maybe = restartMayCome(s);
  status.textContent = maybe ? "restarting?" : STATUS_TEXT[gone ? "gone" : run.status] || run.status;
  status.className = "badge " + (gone ? "oom_emergency_exit" : maybe ? "restarting" : run.status);
  const age = run.last_time ? now - run.last_time : null;
  const updated = $("run-updated");
  updated.textContent = run.last_time ? "last record " + Fmt.ago(age) : "no records yet";
  const quiet = run.status === "running" && age > STALE_AFTER_S, alive = !!trainer && trainer.alive === true;
  const hung = quiet && alive && age > HUNG_AFTER_S;
  updated.classList.toggle("warn", gone || hung || (quiet && !alive));
  updated.title = trainer ? `the trainer: pid ${trainer.pid} on ${trainer.host}, ${trainer.command || "?"}` : "";
  if (quiet && alive) updated.textContent = `quiet for ${Fmt.dur(age)}; trainer alive${hung ? ": hung?" : ""}`;
  else if (quiet && !gone) updated.textContent += " — is the trainer alive?";
  const alert = $("run-alert"), again = run.restarting;
  alert.hidden = !gone && !again && !maybe;
  alert.classList.toggle("expected", (!!again || maybe) && !gone);
  if (maybe) alert.textContent = `The trainer (pid ${trainer.pid} on ${trainer.host}) has ended without an end ` +
    `record, and torchrun has restarts left (${(run.restart || 0) + 1} of ${run.max_restarts}): an out-of-memory ` +
    "error on another rank ends rank 0 this way, and torchrun starts the job again from the last checkpoints. The " +
    `page follows it; with no restart ${Fmt.dur(RESTART_GRACE_S)} after its last record, the run counts as stopped.`;
  else if (again && gone) alert.textContent = `torchrun's restart ${again.next} of ${again.max} has not come within ` +
    `${Fmt.dur(RESTART_GRACE_S)} of the ${STATUS_TEXT[again.after] || again.after}: the job has stopped. Its last ` +
    "checkpoints are where train.resume=last (--resume) goes on.";
  else if (again) alert.textContent = `After ${STATUS_TEXT[again.after] || again.after}, torchrun starts the job again ` +
    `by itself (restart ${again.next} of ${again.max}): it goes on from the last checkpoints` +
    (again.after === "oom_emergency_exit" ? ", with the recovery the OOM saved" : "") + ". The page follows it.";
  else if (gone) alert.textContent = `The trainer (pid ${trainer.pid} on ${trainer.host}: ${trainer.command || "?"}) ` +
    `has ended without an end record: it was killed or crashed; its last record came ${Fmt.ago(age)}. ` +
    "Its last checkpoints are where train.resume=last (--resume) goes on.";
  $("run-stage").textContent = run.stage ? "Stage " + run.stage : "—";
  const from = run.inside_epoch ? `in epoch ${run.inside_epoch}` : `from epoch ${run.start_epoch}`;
  $("run-resumes").textContent = run.resumes ? `resumed ×${run.resumes} (${from})` :
    (run.tasks.length ? run.tasks.map(t => (TASKS[t] || {label: t}).label).join(" + ") : "");
  const current = Math.max(0, ...Object.values(s.tasks).map(t => t.epoch || 0));
  const total = run.epochs || Math.max(0, ...Object.values(s.tasks).map(t => t.max_epochs || 0));
  $("run-epoch").textContent = current ? `${current} / ${total || "?"}` : "—";
  $("run-epoch-sub").textContent = run.epoch ? `${run.epoch} completed` : (current ? "first epoch" : "");
  const end = run.ended || (isRunning(s) ? now : run.last_time);
  // the stage's clock, as the time cap counts it: read when this run started (after a resume, the earlier runs'
  // time; its own set-up too), then this run's time since
  const before = run.elapsed_before || 0;
  $("run-elapsed").textContent = run.started ? Fmt.dur(before + end - run.started) : "—";
  $("run-started").textContent = !run.started ? "" : run.resumes && before > 0 ?
    `resumed ${Fmt.clock(run.started)} at ${Fmt.dur(before)} on the stage's clock` : "started " + Fmt.clock(run.started);
  renderEta(run, now, isRunning(s));
}

function renderEta(run, now, running) {
  let eta = null, sub = "", capFirst = false;
  // the stage's time cap, on the stage's clock: a run whose ETA lies past it is ended by the cap
  const capLeft = isNum(run.time_limit_s) && run.started ?
    run.time_limit_s - (run.elapsed_before || 0) - (now - run.started) : null;
  if (running && isNum(run.eta)) {
    eta = Math.max(0, run.eta - (now - run.last_time));
    capFirst = capLeft !== null && eta > capLeft;
    sub = capFirst ? `cap (${Fmt.dur(run.time_limit_s)}) ends it in ${Fmt.dur(Math.max(0, capLeft))}` :
      capLeft !== null ? `ends ≈ ${Fmt.clock(now + eta)} · cap in ${Fmt.dur(capLeft)}` : "finishes ≈ " + Fmt.clock(now + eta);
  } else if (running) sub = "after a few steps";
  else if (run.ended) sub = "ended " + Fmt.clock(run.ended);
  else if (run.last_time) sub = "last step " + Fmt.clock(run.last_time);
  if (run.restarting) sub = "after torchrun's restart";
  // a task with no step yet has no pace (the detector under train.strategy=sequential): the ETA is a lower bound
  const waiting = eta !== null ? (run.eta_waiting || []) : [];
  if (waiting.length && !capFirst) sub = "not counting the " + waiting.map(t => (TASKS[t] || {label: t}).label.toLowerCase()).join(", ") +
    " (no step yet)";
  $("run-eta").textContent = eta !== null ? (waiting.length ? "≥ " : "") + Fmt.dur(eta) :
    (run.restarting ? "—" : run.ended ? "done" : "—");
  $("run-finish").textContent = sub;
  $("run-finish").classList.toggle("warn", capFirst);
  $("run-finish").title = capFirst ? "the stage's time cap (data.progressive_validation.stage_N.time_limit_hours) " +
    "comes before this ETA: the run will stop there, short of its epochs" : "";
}

// ---------- tasks ----------
function renderTasks(state) {
  const names = Object.keys(state.tasks);
  $("empty-run").style.display = names.length ? "none" : "";
  for (const name of names) {
    if (!page.panels[name]) page.panels[name] = makePanel(name);
    updatePanel(page.panels[name], state.tasks[name]);
  }
  for (const name of Object.keys(page.panels)) {
    if (!state.tasks[name]) { page.panels[name].root.remove(); delete page.panels[name]; }
  }
}

function taskInfo(name) {
  return TASKS[name] || {label: name, accent: "#8b98a8", valTitle: "Validation", metrics: []};
}

function makePanel(name) {
  const info = taskInfo(name);
  const root = $("task-template").content.firstElementChild.cloneNode(true);
  root.id = "task-" + name;
  root.style.setProperty("--accent", info.accent);
  root.querySelector(".task-name").textContent = info.label;
  root.querySelector(".val-title").textContent = info.valTitle;
  const order = Object.keys(TASKS);
  const before = [...$("tasks").querySelectorAll(".task")].find(el => order.indexOf(el.id.slice(5)) > order.indexOf(name));
  $("tasks").insertBefore(root, before || null);
  const chart = (key, opts) => new PillCharts.LineChart(root.querySelector(`[data-chart="${key}"]`), opts);
  const epochAxis = {xLabel: "epoch", xFormat: Fmt.epochTick};
  return {
    name, root,
    loss: chart("loss", {...epochAxis, yLabel: "loss", yFormat: Fmt.tick, tipFormat: v => Fmt.num(v), logToggle: true,
                         emptyText: "waiting for the first step…"}),
    val: chart("val", {...epochAxis, yLabel: "%", yFormat: Fmt.tick, tipFormat: v => v.toFixed(1) + " %", yCeil: 100, yClamp: [0, 100],
                       emptyText: "no validation yet (after epoch 1)"}),
    lr: chart("lr", {...epochAxis, yLabel: "learning rate", yFormat: Fmt.expTick, tipFormat: Fmt.lr,
                     yFloor: 0, emptyText: "waiting for the first step…"}),
    thr: chart("throughput", {...epochAxis, yLabel: "images / s", yFormat: Fmt.tick, tipFormat: v => Fmt.rate(v) + " img/s",
                              yFloor: 0, emptyText: "waiting for the first step…"}),
    time: chart("time", {...epochAxis, yLabel: "ms per step", yFormat: Fmt.tick, tipFormat: v => v.toFixed(1) + " ms",
                         yFloor: 0, emptyText: "waiting for the first step…"}),
  };
}

function updatePanel(panel, t) {
  const root = panel.root;
  root.querySelector(".task-where").textContent = t.epoch ?
    `epoch ${t.epoch} / ${t.max_epochs} · step ${t.step} / ${t.steps}` : "waiting for the first step…";
  renderTaskEta(panel, t);
  // Steps are logged every few steps, so a finished task's last record may stop short of 100 %.
  const epochFrac = t.finished ? 1 : (t.steps ? t.step / t.steps : 0);
  const runFrac = t.finished ? 1 : (t.max_epochs ? (t.progress || 0) / t.max_epochs : 0);
  root.querySelector(".epoch-fill").style.width = (100 * epochFrac).toFixed(1) + "%";
  root.querySelector(".run-fill").style.width = (100 * runFrac).toFixed(1) + "%";
  root.querySelector(".epoch-pct").textContent = t.epoch ? Math.round(100 * epochFrac) + " %" : "";
  root.querySelector(".run-pct").textContent = t.epoch ? Math.round(100 * runFrac) + " %" : "";
  root.querySelector(".kpis").replaceChildren(...kpis(t, page.state.run.world_size || 1).map(k => kpiEl(t.name, k)));
  updateCharts(panel, t);
}

// Counts down between updates; frozen once the run is no longer running.
function renderTaskEta(panel, t) {
  const eta = panel.root.querySelector(".task-eta"), running = isRunning(page.state);
  if (t.finished) eta.innerHTML = `<span class="muted">${t.stopped_early ? "stopped early" : "finished"}</span>`;
  else if (isNum(t.eta) && running) {
    const left = Math.max(0, t.eta - (serverNow() - (t.last.time || serverNow())));
    eta.innerHTML = `<span class="muted">ETA</span> ${Fmt.dur(left)}`;
  } else eta.innerHTML = `<span class="muted">${running ? "ETA after a few steps" : "stopped"}</span>`;
}

// The headline numbers of a task: training first, then validation, then speed.
// Under torchrun the step records are rank 0's own: its throughput, its data wait, its CUDA memory.
function kpis(t, ranks) {
  const last = t.last || {}, lv = t.last_val || {}, info = taskInfo(t.name);
  const out = [{key: "loss", label: "train loss", value: Fmt.num(last.loss), bad: typeof last.loss === "string",
                hint: last.global_step ? `global step ${last.global_step}` : ""}];
  if ("val_loss" in lv) out.push({key: "val_loss", label: "val loss", value: Fmt.num(lv.val_loss), hint: `epoch ${lastValEpoch(t)}`});
  for (const [key, label] of info.metrics) {
    if (!(key in lv)) continue;
    const best = t.best && t.best.metric === key ? t.best : null;
    out.push({key, label, value: Fmt.pct(lv[key]), best: !!best,
              hint: best ? `best ${Fmt.pct(best.value)} @ e${best.epoch}` : `epoch ${lastValEpoch(t)}`});
  }
  if (!t.last_val) out.push({key: "val", label: "validation", value: "—", hint: "after epoch 1"});
  out.push({key: "lr", label: "learning rate", value: Fmt.lr(last.lr)});
  const job = ranks > 1 && isNum(last.throughput);
  out.push({key: "throughput", label: "throughput", value: Fmt.rate(job ? ranks * last.throughput : last.throughput),
            unit: "img/s", hint: job ? `${ranks} ranks × ${Fmt.rate(last.throughput)}` : ""});
  const total = (last.data_time || 0) + (last.compute_time || 0);
  out.push({key: "data_share", label: "data wait", value: total ? Math.round(100 * last.data_time / total) : "—",
            unit: total ? "%" : "", hint: total ? `${Fmt.ms(last.data_time)} of ${Fmt.ms(total)}` : ""});
  if (last.cuda_mem > 0) out.push({key: "cuda_mem", label: "CUDA memory", value: Fmt.mb(last.cuda_mem),
                                   hint: ranks > 1 ? "rank 0's" : "allocated by trainer"});
  return out;
}

function lastValEpoch(t) { return t.val.epoch[t.val.epoch.length - 1]; }

function kpiEl(task, k) {
  const el = document.createElement("div");
  el.className = "kpi" + (k.bad ? " bad" : "") + (k.best ? " best" : "");
  el.innerHTML = `<div class="lab"></div><div class="val" id="kpi-${task}-${k.key.replace(/[^A-Za-z0-9_]/g, "-")}"></div><div class="hint"></div>`;
  el.querySelector(".lab").textContent = k.label;
  el.querySelector(".val").textContent = k.value;
  if (k.unit && k.value !== "—") el.querySelector(".val").insertAdjacentHTML("beforeend", `<small>${k.unit}</small>`);
  el.querySelector(".hint").textContent = k.hint || "";
  return el;
}

function updateCharts(panel, t) {
  const tr = t.train, info = taskInfo(t.name), val = t.val;
  const xMax = Math.max(1, Math.ceil(Math.max(t.progress || 0, ...val.epoch, ...tr.x.filter(isNum)) - 1e-9));
  const domain = [0, xMax];
  // faint: the highest loss of the steps each point stands for (a spike or a NaN, a gap, still shows once the
  // points are thinned); bold: the loss as sampled, smoothed (the highest would lift it)
  const loss = [{name: "train (highest)", color: info.accent, x: tr.x, y: tr.loss_peak || tr.loss, width: 1.2, faint: true,
                 hideLegend: true},
                {name: "train", color: info.accent, x: tr.x, y: PillCharts.smooth(tr.loss, 0.6), width: 2.2}];
  if (val.val_loss) loss.push({name: "validation", color: "#f778ba", x: val.epoch, y: val.val_loss, dots: true});
  panel.loss.update(loss, domain);
  const pct = ys => ys.map(v => (isNum(v) ? 100 * v : null));
  const metrics = [];
  for (const [key, label, color] of info.metrics) {
    if (val[key]) metrics.push({name: label, color, x: val.epoch, y: pct(val[key]), dots: true});
    if (val["raw_" + key]) metrics.push({name: label + " (raw weights)", color, x: val.epoch, y: pct(val["raw_" + key]), faint: true});
  }
  panel.val.update(metrics, domain);
  panel.lr.update([{name: "learning rate", color: "#d29922", x: tr.x, y: tr.lr, hideLegend: true}], domain);
  const ranks = page.state.run.world_size || 1;  // the step records are rank 0's
  panel.thr.update([{name: "images / s", color: "#39c5cf", x: tr.x, y: tr.throughput.map(v => (isNum(v) ? ranks * v : null)),
                     hideLegend: true}], domain);
  const ms = ys => ys.map(v => (isNum(v) ? 1000 * v : null));
  const total = tr.data_time.map((d, i) => (isNum(d) && isNum(tr.compute_time[i]) ? 1000 * (d + tr.compute_time[i]) : null));
  // Lightly smoothed: per-step timings jitter, and what matters is the share of the step spent waiting for data.
  const sm = ys => PillCharts.smooth(ys, 0.5);
  panel.time.update([{name: "compute", color: "#388bfd", x: tr.x, y: sm(total), fill: true, tipY: ms(tr.compute_time)},
                     {name: "data loading", color: "#f0883e", x: tr.x, y: sm(ms(tr.data_time)), fill: true}], domain);
}

// ---------- side panels ----------
// What the work after training (calibration, reports, the stage's evaluation, the final test) is doing, if anything:
// at Stage 4 it takes hours after the training's end record.
const AFTER_TEXT = {reports: "the validation reports", calibration: "calibration",
                    stage_evaluation: "the stage's evaluation", final_test: "the final test"};

// The steps that failed, named for a person (the others went on: each step fails alone).
function failedSteps(failed) { return (failed || []).map(step => AFTER_TEXT[step] || step).join(", "); }

function afterTraining(after, trainer, failed) {
  if (!after && failed && failed.length) return {badge: "none", sub: `${failedSteps(failed)} failed`,
    text: `The work after training failed at ${failedSteps(failed)}; the other steps went on and the checkpoints ` +
          "are whole. Finish it with the commands logs/pillsnap.log names (pillsnap calibrate / pillsnap evaluate " +
          "--exp EXP), or run the training again with train.resume=last."};
  if (!after) return null;
  const what = AFTER_TEXT[after.step] || after.step, since = isNum(after.since) ? Fmt.clock(after.since) : "?";
  if (after.failed) return {badge: "none", sub: `${what} failed`,
    text: `The work after training failed at ${what} (${since}); the checkpoints are whole. Finish it with ` +
          "pillsnap calibrate / pillsnap evaluate --exp EXP (logs/pillsnap.log says why it failed)."};
  if (trainer && trainer.alive === false) return {badge: "none", sub: `stopped during ${what}`,
    text: `The trainer ended during ${what} (since ${since}) without finishing it. Finish it with ` +
          "pillsnap calibrate / pillsnap evaluate --exp EXP."};
  return {badge: "pending", sub: `after training: ${after.step.replace("stage_", "").replace("_", " ")}`,
          text: `Training has ended; ${what} is under way since ${since}. The Go/No-Go decision comes after it.`};
}

function renderEvaluation(ev, stopped, after, trainer, failed) {
  const card = $("gonogo-card"), badge = $("gonogo"), sub = $("gonogo-sub"), box = $("evaluation");
  const working = ev ? null : afterTraining(after, trainer, failed);
  if (working) {
    card.className = "card gonogo";
    badge.className = "badge";
    badge.textContent = working.badge;
    sub.textContent = working.sub;
    box.replaceChildren(Object.assign(document.createElement("p"), {className: "muted", textContent: working.text}));
    return;
  }
  if (!ev) {
    card.className = "card gonogo";
    badge.className = "badge";
    badge.textContent = stopped ? "none" : "pending";
    sub.textContent = stopped ? "the run stopped before its end" : "decided when the stage run ends";
    box.innerHTML = stopped
      ? `<p class="muted">No decision: the run stopped before its end. Resume it (train.resume=last); the Go/No-Go decision comes when it ends.</p>`
      : `<p class="muted">Pending: the Go/No-Go decision and its reasons appear when the stage run ends.</p>`;
    return;
  }
  const status = String(ev.status || "unknown");
  card.className = "card gonogo " + status;
  badge.className = "badge " + status;
  badge.textContent = status.replace("_", "-");
  sub.textContent = (ev.recommendation || "").replaceAll("_", " ").toLowerCase();
  box.replaceChildren();
  const head = box.appendChild(document.createElement("div"));
  head.className = "eval-head";
  head.innerHTML = `<span class="badge ${status}"></span><div><div class="rec"></div><div class="muted when"></div></div>`;
  head.querySelector(".badge").textContent = status.replace("_", "-");
  head.querySelector(".rec").textContent = (ev.recommendation || "").replaceAll("_", " ");
  head.querySelector(".when").textContent = `stage ${ev.stage ?? "?"} · ${Fmt.clock(ev.time)}`;
  // One verdict: the badge, the recommendation and the next step all come from the same evaluation.
  if (ev.action) addLine(box, "next", `Next step: ${ev.action}`);
  if (failed && failed.length) addLine(box, "warn", `The work after training failed at ${failedSteps(failed)}: ` +
    "finish it with the commands logs/pillsnap.log names, or run the training again with train.resume=last.");
  const score = ev.performance_score ?? ev.advisor?.performance_score;
  if (isNum(score)) addLine(box, "score", `performance score ${score.toFixed(3)}`);
  const reasons = ev.reasons && ev.reasons.length ? ev.reasons : ["all checks and targets met"];
  addList(box, "reasons", reasons);
  const notes = (ev.not_comparable || []).filter(n => isNum(n.value)).map(n =>
    `${n.path} ${Fmt.num(n.value)} on ${n.device} (the target ${n.threshold} is for ${n.target_device})`);
  if (notes.length) { addLine(box, "sub-head", "Not comparable on this device"); addList(box, "reasons muted", notes); }
  const suggestions = (ev.suggestions || ev.advisor?.suggestions || []).slice(0, 3);
  if (suggestions.length) { addLine(box, "sub-head", "Suggestions"); addList(box, "reasons muted", suggestions); }
  if (ev.choice?.text) addLine(box, "choice", `Chosen: ${ev.choice.text} (${ev.choice.how || "recorded"})`);
}

function addLine(box, cls, text) {
  const el = box.appendChild(document.createElement("div"));
  el.className = cls;
  el.textContent = text;
}

function addList(box, cls, items) {
  const list = box.appendChild(document.createElement("ul"));
  list.className = cls;
  for (const item of items) list.appendChild(document.createElement("li")).textContent = item;
}

function renderOom(events) {
  const count = $("oom-count");
  count.textContent = events.length;
  count.className = "count" + (events.length ? " some" : "");
  if (!events.length) { $("oom").innerHTML = `<p class="ok">No out-of-memory events.</p>`; return; }
  const list = document.createElement("ul");
  list.className = "oom-list";
  for (const e of [...events].reverse()) {
    const li = list.appendChild(document.createElement("li"));
    if (e.action === "emergency_exit") li.className = "fatal";
    const st = e.state || {};
    const knobs = st.batch_size ? ` · batch ${st.batch_size} × accum ${st.grad_accum || 1}` : "";
    li.innerHTML = `<div><b></b> <span class="what"></span></div><div class="when"></div>`;
    li.querySelector("b").textContent = (TASKS[e.task] || {label: e.task || "?"}).label;
    li.querySelector(".what").textContent = OOM_ACTIONS[e.action] || e.action || "";
    li.querySelector(".when").textContent =
      `${Fmt.clock(e.time)} · step ${e.global_step ?? "?"} · retry ${e.retries ?? "?"}${knobs}`;
  }
  $("oom").replaceChildren(list);
}

function onSystem(sys) {
  page.system = sys;
  const keep = (arr, v) => { arr.push(v); if (arr.length > 150) arr.shift(); };
  keep(page.history.cpu, sys.cpu_percent);
  keep(page.history.ram, sys.ram_percent);
  keep(page.history.gpu, sys.gpus.length ? Math.max(...sys.gpus.map(g => g.mem_percent || 0)) : null);
  const parts = [meter("CPU", sys.cpu_percent, `${sys.cpu_count} cores · load ${sys.load_1m}`, "", page.history.cpu),
                 meter("RAM", sys.ram_percent, `${Fmt.gb(sys.ram_used_gb)} / ${Fmt.gb(sys.ram_total_gb)} GB`, "", page.history.ram)];
  for (const g of sys.gpus) {
    parts.push(meter(`GPU ${g.index} memory`, g.mem_percent, `${Fmt.gb(g.mem_used_gb)} / ${Fmt.gb(g.mem_total_gb)} GB`,
                     `${esc(g.name)}${isNum(g.util_percent) ? " · util " + g.util_percent + " %" : ""}`,
                     sys.gpus.length === 1 ? page.history.gpu : null, "gpu-" + g.index));
  }
  if (!sys.gpus.length) parts.push(`<p class="muted small">GPU: ${esc(sys.gpu_note || "none found")}</p>`);
  if (sys.disk) parts.push(meter("Disk (experiment)", sys.disk.percent, `${Fmt.gb(sys.disk.free_gb)} GB free`,
                                 `of ${Fmt.gb(sys.disk.total_gb)} GB`, null));
  $("system").innerHTML = parts.join("");
}

function meter(name, pct, detail, extra, history, id) {
  const cls = pct >= 95 ? "full" : pct >= 80 ? "hot" : "";
  const spark = history ? sparkline(history) : "";
  return `<div class="meter" ${id ? `id="${id}"` : ""}><div class="meter-top"><span class="name">${name}</span>
    <span class="num">${Fmt.pct100(pct)}</span></div><div class="bar"><div class="fill ${cls}" style="width:${Math.min(100, pct || 0)}%"></div></div>
    <div class="detail"><span>${detail}</span><span>${extra}</span></div>${spark}</div>`;
}

function sparkline(values) {
  const pts = values.map((v, i) => (isNum(v) ? `${(i / 149 * 300).toFixed(1)},${(26 - v / 100 * 24).toFixed(1)}` : null)).filter(Boolean);
  return pts.length < 2 ? "" : `<svg class="spark" viewBox="0 0 300 27" preserveAspectRatio="none">
    <polyline points="${pts.join(" ")}" fill="none" stroke="#58a6ff" stroke-width="1.5" vector-effect="non-scaling-stroke"/></svg>`;
}

connect();
setInterval(tick, 1000);
