//! The training's progress as plain text, where stdout is not a terminal (CI, a pipe, a log
//! file): a line a step with its metrics, and the validation's means after each pass. Burn's own
//! renderer there prints only its progress counters (`ProgressSnapshot { .. }` a step).

use std::collections::HashMap;
use std::io::Write;

use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{MetricDefinition, MetricEntry, MetricId, NumericEntry};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};

/// Lines of `step N/total: metric value, ...` and `validation after step N: ...` into `out`.
pub struct PlainRenderer<W: Write + Send + Sync = std::io::Stdout> {
    out: W,
    names: HashMap<MetricId, String>,
    /// The steps (Learner items) of a training pass, and the passes done and in all.
    steps_per_epoch: usize,
    epochs_done: usize,
    epochs: usize,
    validating: bool,
    /// The metrics' latest values since the last line, in the order they came.
    values: Vec<(String, String)>,
}

impl PlainRenderer {
    pub fn stdout() -> Self {
        Self::new(std::io::stdout())
    }
}

impl<W: Write + Send + Sync> PlainRenderer<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            names: HashMap::new(),
            steps_per_epoch: 0,
            epochs_done: 0,
            epochs: 0,
            validating: false,
            values: Vec::new(),
        }
    }

    fn record(&mut self, state: MetricState) {
        let (entry, value) = match state {
            MetricState::Generic(entry) => (entry, None),
            MetricState::Numeric(entry, numeric) => (entry, numeric),
        };
        let MetricEntry {
            metric_id,
            serialized_entry,
        } = entry;
        let name = self
            .names
            .get(&metric_id)
            .cloned()
            .unwrap_or_else(|| format!("{metric_id:?}"));
        // A step's line takes each metric's value for the step; a pass's, its mean (`Final`).
        let text = match value {
            Some(NumericEntry::Final(_)) if !self.validating => return,
            Some(value) => number(value.current()),
            None => serialized_entry.formatted,
        };
        match self.values.iter_mut().find(|(known, _)| *known == name) {
            Some((_, old)) => *old = text,
            None => self.values.push((name, text)),
        }
    }

    /// Writes `head: name value, ...` and starts the next line's values afresh.
    fn line(&mut self, head: String) {
        let values: Vec<String> = self
            .values
            .drain(..)
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        // Progress output only: a closed pipe must not stop the training.
        let _ = writeln!(self.out, "{head}: {}", values.join(", "));
        let _ = self.out.flush();
    }

    fn step(&self, items: usize) -> usize {
        self.epochs_done * self.steps_per_epoch + items
    }
}

/// Four significant digits, in exponent form where fixed would lose them.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude != 0.0 && !(1e-2..1e5).contains(&magnitude) {
        format!("{value:.3e}")
    } else {
        format!("{value:.4}")
    }
}

impl<W: Write + Send + Sync> MetricsRendererTraining for PlainRenderer<W> {
    fn update_train(&mut self, state: MetricState) {
        self.record(state);
    }

    fn update_valid(&mut self, state: MetricState) {
        self.record(state);
    }
}

impl<W: Write + Send + Sync> TrainingProgressLogger for PlainRenderer<W> {
    fn start(
        &mut self,
        total_epochs: usize,
        starting_epoch: usize,
        _total_items: Option<usize>,
        _label: Option<&str>,
    ) {
        // Burn's epochs count from 1; a resumed run starts after its checkpoint's.
        self.epochs = total_epochs;
        self.epochs_done = starting_epoch.saturating_sub(1);
    }

    /// `epoch` (from 1) has ended.
    fn update_epoch(&mut self, epoch: usize) {
        self.epochs_done = epoch;
    }

    fn start_split(&mut self, split: &str, total_items: usize) {
        self.validating = split == "valid";
        if !self.validating {
            self.steps_per_epoch = total_items;
        }
        self.values.clear();
    }

    fn update_split(&mut self, items_processed: usize) {
        if !self.validating {
            let total = self.epochs * self.steps_per_epoch;
            self.line(format!("step {}/{total}", self.step(items_processed)));
        }
    }

    fn end_split(&mut self) {
        if self.validating {
            let step = self.step(self.steps_per_epoch);
            self.line(format!("validation after step {step}"));
        }
    }

    fn end(&mut self) {}

    fn log_event_training(&mut self, _event: String) {}
}

impl<W: Write + Send + Sync> MetricsRendererEvaluation for PlainRenderer<W> {
    fn update_test(&mut self, _name: EvaluationName, state: MetricState) {
        self.record(state);
    }
}

impl<W: Write + Send + Sync> EvaluationProgressLogger for PlainRenderer<W> {
    fn start_global_progress(&mut self, _total_tests: usize) {}

    fn start_test(&mut self, _name: &str, _total_items: usize) {
        self.values.clear();
    }

    fn update_test_progress(&mut self, _items_processed: usize) {}

    fn end_test(&mut self) {
        self.line("test".to_string());
    }

    fn end_global_progress(&mut self) {}

    fn log_event_evaluation(&mut self, _event: String) {}
}

impl<W: Write + Send + Sync> MetricsRenderer for PlainRenderer<W> {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names
            .insert(definition.metric_id, definition.name.to_string());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use burn::train::metric::{LearningRateMetric, LossMetric, SerializedEntry};

    use super::*;

    fn numeric(id: &MetricId, value: NumericEntry) -> MetricState {
        let entry = SerializedEntry::new(String::new(), value.serialize());
        MetricState::Numeric(MetricEntry::new(id.clone(), entry), Some(value))
    }

    /// Two passes of two steps, resumed after pass 1 of 3, validation after each: a line a step
    /// with that step's values, and the validation's means (`Final`) after the pass.
    #[test]
    fn a_line_a_step_and_the_validation_means_after_each_pass() {
        let loss = MetricId::new(Arc::new("loss".into()));
        let lr = MetricId::new(Arc::new("lr".into()));
        let mut renderer = PlainRenderer::new(Vec::new());
        renderer.register_metric(MetricDefinition::new(loss.clone(), &LossMetric::new()));
        renderer.register_metric(MetricDefinition::new(
            lr.clone(),
            &LearningRateMetric::new(),
        ));
        renderer.start(3, 2, None, None);
        for epoch in 2..=3 {
            renderer.start_split("train", 2);
            for step in 1..=2 {
                renderer.update_train(numeric(&loss, NumericEntry::Value(3.0 / step as f64)));
                renderer.update_train(numeric(&lr, NumericEntry::Value(2e-4)));
                renderer.update_split(step);
            }
            renderer.update_train(numeric(&loss, NumericEntry::Final(2.25)));
            renderer.end_split();
            renderer.start_split("valid", 5);
            renderer.update_valid(numeric(&loss, NumericEntry::Value(9.0)));
            renderer.update_split(1);
            renderer.update_valid(numeric(&loss, NumericEntry::Final(epoch as f64)));
            renderer.end_split();
            renderer.update_epoch(epoch);
        }
        let text = String::from_utf8(renderer.out).unwrap();
        let expected = "\
step 3/6: Loss 3.0000, Learning Rate 2.000e-4
step 4/6: Loss 1.5000, Learning Rate 2.000e-4
validation after step 4: Loss 2.0000
step 5/6: Loss 3.0000, Learning Rate 2.000e-4
step 6/6: Loss 1.5000, Learning Rate 2.000e-4
validation after step 6: Loss 3.0000
";
        assert_eq!(text, expected);
    }
}
