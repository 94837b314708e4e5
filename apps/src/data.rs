//! Training data: Alpaca, ShareGPT, plain-text and chatterbot-corpus records, written with a chat
//! template, tokenized with the loss on the responses only (by default), an EOS after every
//! response, cut to the longest allowed length and grouped into batches of similar lengths.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use llama_burn::{ChatTemplate, Message, Role, Tokenizer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::Value;

/// One training record, before templating.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A conversation; the assistant's turns are what the model learns.
    Chat(Vec<Message>),
    /// Plain text; every token counts.
    Text(String),
}

/// Token ids and, per id, whether predicting it counts in the loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The records of `path` in `format` (auto, alpaca, sharegpt, text, chatterbot); a folder is
/// read as a chatterbot corpus (every `.yml` in it).
pub fn read_records(path: &Path, format: &str) -> Result<Vec<Record>> {
    if path.is_dir() || format == "chatterbot" {
        return read_chatterbot(path);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading data file {}", path.display()))?;
    let values: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).with_context(|| format!("{}: JSON array", path.display()))?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .with_context(|| format!("{}: line {}: not JSON", path.display(), i + 1))
            })
            .collect::<Result<_>>()?
    };
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            parse_record(value, format)
                .with_context(|| format!("{}: record {}", path.display(), i + 1))
        })
        .collect()
}

fn parse_record(value: &Value, format: &str) -> Result<Record> {
    let field = |key: &str| value.get(key).and_then(Value::as_str);
    let format = match format {
        "auto" if value.get("conversations").is_some() => "sharegpt",
        "auto" if value.get("instruction").is_some() => "alpaca",
        "auto" if value.get("text").is_some() => "text",
        "auto" => bail!("neither `conversations`, `instruction` nor `text`: unknown format"),
        other => other,
    };
    match format {
        "alpaca" => {
            let instruction = field("instruction").context("no `instruction` string")?;
            let output = field("output").context("no `output` string")?;
            let user = match field("input").filter(|input| !input.trim().is_empty()) {
                Some(input) => format!("{instruction}\n\n{input}"),
                None => instruction.to_string(),
            };
            Ok(Record::Chat(vec![
                Message::new(Role::User, user),
                Message::new(Role::Assistant, output),
            ]))
        }
        "sharegpt" => {
            let turns = value
                .get("conversations")
                .and_then(Value::as_array)
                .context("no `conversations` list")?;
            let messages = turns
                .iter()
                .map(|turn| {
                    let from = turn.get("from").and_then(Value::as_str);
                    let text = turn.get("value").and_then(Value::as_str);
                    let (Some(from), Some(text)) = (from, text) else {
                        bail!("a turn without `from` and `value` strings");
                    };
                    let role = match from {
                        "system" => Role::System,
                        "human" | "user" => Role::User,
                        "gpt" | "assistant" | "bot" => Role::Assistant,
                        other => bail!("turn from {other:?}: expected human, gpt or system"),
                    };
                    Ok(Message::new(role, text))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Record::Chat(messages))
        }
        "text" => Ok(Record::Text(
            field("text").context("no `text` string")?.into(),
        )),
        other => bail!("format {other:?}: use auto, alpaca, sharegpt, text or chatterbot"),
    }
}

/// A chatterbot-corpus YAML file, or every `.yml` of a folder: `conversations` are lists of
/// turns, the user's first, the bot's answer next.
fn read_chatterbot(path: &Path) -> Result<Vec<Record>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading data folder {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|file| file.extension().is_some_and(|ext| ext == "yml"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut records = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading data file {}", file.display()))?;
        let corpus: serde_yaml::Value =
            serde_yaml::from_str(&text).with_context(|| format!("{}: not YAML", file.display()))?;
        let conversations = corpus
            .get("conversations")
            .and_then(serde_yaml::Value::as_sequence)
            .with_context(|| format!("{}: no `conversations` list", file.display()))?;
        // Entries that are not lists of two or more strings (a few in the corpus) are skipped.
        for conversation in conversations {
            let Some(turns) = conversation.as_sequence() else {
                continue;
            };
            let turns: Option<Vec<String>> = turns.iter().map(yaml_text).collect();
            let Some(turns) = turns.filter(|turns| turns.len() >= 2) else {
                continue;
            };
            let messages = turns
                .into_iter()
                .enumerate()
                .map(|(i, text)| {
                    let role = if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    };
                    Message::new(role, text)
                })
                .collect();
            records.push(Record::Chat(messages));
        }
    }
    Ok(records)
}

/// A YAML scalar as text (the corpus quotes some answers, not others: `'1963'`, `1963`).
fn yaml_text(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(text) => Some(text.clone()),
        serde_yaml::Value::Number(number) => Some(number.to_string()),
        serde_yaml::Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// How records become token ids.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub max_seq_len: usize,
    /// Count the prompt tokens in the loss as well.
    pub train_on_prompt: bool,
}

impl Encoder<'_> {
    /// The record's ids: the template's text of each turn, with the assistant's turns (and the
    /// EOS after each) trained, and a BOS first when the tokenizer has one.
    pub fn encode(&self, record: &Record) -> Result<Example> {
        let mut example = Example {
            ids: Vec::new(),
            trained: Vec::new(),
        };
        if let Some(bos) = self.tokenizer.bos_id {
            example.push(&[bos], false);
        }
        match record {
            Record::Text(text) => {
                let ids = self.tokenizer.encode(text)?;
                example.push(&ids, true);
                if let Some(eos) = self.tokenizer.eos_id {
                    example.push(&[eos], true);
                }
            }
            Record::Chat(messages) => {
                let mut written = String::new();
                for (i, message) in messages.iter().enumerate() {
                    if message.role != Role::Assistant {
                        continue;
                    }
                    // The prompt up to this answer, then the answer as the template closes it.
                    let prompt = self.template.render(&messages[..i], true);
                    let through = self.template.render(&messages[..=i], false);
                    let new_prompt = prompt.strip_prefix(written.as_str()).unwrap_or(&prompt);
                    let answer = through.strip_prefix(prompt.as_str()).unwrap_or(&through);
                    example.push(&self.tokenizer.encode(new_prompt)?, self.train_on_prompt);
                    let mut answer_ids = self.tokenizer.encode(answer)?;
                    if let Some(eos) = self.tokenizer.eos_id
                        && !answer_ids.contains(&eos)
                    {
                        answer_ids.push(eos);
                    }
                    example.push(&answer_ids, true);
                    written = through;
                }
            }
        }
        example.ids.truncate(self.max_seq_len);
        example.trained.truncate(self.max_seq_len);
        Ok(example)
    }
}

impl Example {
    fn push(&mut self, ids: &[u32], trained: bool) {
        self.ids.extend_from_slice(ids);
        self.trained.extend(std::iter::repeat_n(trained, ids.len()));
    }
}

/// Examples split into training and validation parts (shuffled with `seed` first).
pub fn split(mut examples: Vec<Example>, valid_fraction: f64, seed: u64) -> Split {
    examples.shuffle(&mut StdRng::seed_from_u64(seed));
    let valid = ((examples.len() as f64 * valid_fraction).round() as usize)
        .max(usize::from(valid_fraction > 0.0 && examples.len() > 1))
        .min(examples.len().saturating_sub(1));
    let train = examples.split_off(valid);
    Split {
        train,
        valid: examples,
    }
}

pub struct Split {
    pub train: Vec<Example>,
    pub valid: Vec<Example>,
}

/// Batches of `batch_size` examples of similar lengths, in an order shuffled by `seed`: the
/// examples are shuffled, sorted by length within windows of 32 batches, cut into batches, and
/// the batches shuffled again, so padding stays small without ordering the run by length.
pub fn length_grouped_batches(
    examples: &[Example],
    batch_size: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::new();
    for window in order.chunks_mut(batch_size * 32) {
        window.sort_by_key(|&i| examples[i].len());
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_are_read_by_their_keys() {
        let alpaca = json!({"instruction": "Add", "input": "1 and 2", "output": "3"});
        let Record::Chat(messages) = parse_record(&alpaca, "auto").unwrap() else {
            panic!("chat expected");
        };
        assert_eq!(messages[0].content, "Add\n\n1 and 2");
        assert_eq!(messages[1], Message::new(Role::Assistant, "3"));

        let sharegpt = json!({"conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"}]});
        let Record::Chat(messages) = parse_record(&sharegpt, "auto").unwrap() else {
            panic!("chat expected");
        };
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0].role, Role::System);

        let text = json!({"text": "Once upon a time"});
        assert_eq!(
            parse_record(&text, "auto").unwrap(),
            Record::Text("Once upon a time".into())
        );
        let err = parse_record(&json!({"prompt": "x"}), "auto").unwrap_err();
        assert!(err.to_string().contains("unknown format"), "{err}");
    }

    #[test]
    fn batches_group_lengths_and_cover_every_example() {
        let examples: Vec<Example> = (0..100)
            .map(|i| Example {
                ids: vec![0; 1 + (i * 37) % 50],
                trained: vec![true; 1 + (i * 37) % 50],
            })
            .collect();
        let batches = length_grouped_batches(&examples, 4, 7);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        // Sorted within each window: a batch's lengths span far less than the whole range.
        let spread: usize = batches
            .iter()
            .map(|batch| {
                let lengths = batch.iter().map(|&i| examples[i].len());
                lengths.clone().max().unwrap() - lengths.min().unwrap()
            })
            .sum();
        assert!(
            spread / batches.len() < 10,
            "mean spread {}",
            spread / batches.len()
        );
        assert_eq!(batches, length_grouped_batches(&examples, 4, 7));
    }
}
