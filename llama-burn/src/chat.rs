use serde::{Deserialize, Serialize};

/// Who says a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// How a conversation is written as one prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplate {
    /// LLaMA-2 chat: `<s>[INST] <<SYS>>…<</SYS>> user [/INST] answer </s>`.
    Llama2,
    /// Alpaca's `### Instruction:` / `### Response:`.
    Alpaca,
    /// The QLoRA-LLM seed's `### HUMAN:` / `### RESPONSE:`.
    HumanResponse,
    /// ChatML (`<|im_start|>role\n…<|im_end|>`), SmolLM2's; with the system prompt used when a
    /// conversation has none.
    ChatMl { default_system: Option<String> },
}

const ALPACA_HEADER: &str = "Below is an instruction that describes a task. Write a response \
                             that appropriately completes the request.\n\n";

impl ChatTemplate {
    /// By name: `llama2`, `alpaca`, `human_response`, `chatml`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama2" => Self::Llama2,
            "alpaca" => Self::Alpaca,
            "human_response" => Self::HumanResponse,
            "chatml" => Self::ChatMl {
                default_system: None,
            },
            _ => return None,
        })
    }

    /// The template a GGUF's `tokenizer.chat_template` (Jinja) describes, when it is one of
    /// ours; ChatML keeps the default system prompt written in it.
    pub fn from_jinja(jinja: &str) -> Option<Self> {
        if jinja.contains("<|im_start|>") {
            let default_system = jinja
                .split_once("<|im_start|>system\\n")
                .or_else(|| jinja.split_once("<|im_start|>system\n"))
                .and_then(|(_, rest)| rest.split_once("<|im_end|>"))
                .map(|(system, _)| system.to_string())
                .filter(|system| !system.contains("{{") && !system.contains('\''));
            Some(Self::ChatMl { default_system })
        } else if jinja.contains("[INST]") {
            Some(Self::Llama2)
        } else {
            None
        }
    }

    /// The conversation as text. With `add_generation_prompt`, it ends where the assistant's
    /// next answer begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        match self {
            Self::ChatMl { default_system } => {
                let has_system = messages.first().is_some_and(|m| m.role == Role::System);
                if let (false, Some(system)) = (has_system, default_system) {
                    out += &format!("<|im_start|>system\n{system}<|im_end|>\n");
                }
                for message in messages {
                    let role = match message.role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    out += &format!("<|im_start|>{role}\n{}<|im_end|>\n", message.content);
                }
                if add_generation_prompt {
                    out += "<|im_start|>assistant\n";
                }
            }
            Self::Llama2 => {
                let mut system = None;
                for message in messages {
                    match message.role {
                        Role::System => system = Some(message.content.as_str()),
                        Role::User => {
                            let content = match system.take() {
                                Some(system) => {
                                    format!("<<SYS>>\n{system}\n<</SYS>>\n\n{}", message.content)
                                }
                                None => message.content.clone(),
                            };
                            out += &format!("<s>[INST] {} [/INST]", content.trim());
                        }
                        Role::Assistant => out += &format!(" {} </s>", message.content.trim()),
                    }
                }
            }
            Self::Alpaca | Self::HumanResponse => {
                let (user, assistant, header) = match self {
                    Self::Alpaca => ("### Instruction:\n", "### Response:\n", ALPACA_HEADER),
                    _ => ("### HUMAN:\n", "### RESPONSE:\n", ""),
                };
                for message in messages {
                    match message.role {
                        Role::System => out += &format!("{}\n\n", message.content),
                        Role::User => {
                            if out.is_empty() {
                                out += header;
                            }
                            out += &format!("{user}{}\n\n", message.content);
                        }
                        Role::Assistant => out += &format!("{assistant}{}\n\n", message.content),
                    }
                }
                if add_generation_prompt {
                    out += assistant;
                }
            }
        }
        out
    }

    /// Text that ends an answer, to stop generation on.
    pub fn stop_strings(&self) -> &'static [&'static str] {
        match self {
            Self::ChatMl { .. } => &["<|im_end|>"],
            Self::Llama2 => &["</s>", "[INST]"],
            Self::Alpaca => &["### Instruction:"],
            Self::HumanResponse => &["### HUMAN:"],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<Message> {
        vec![
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello!"),
            Message::new(Role::User, "Capital of France?"),
        ]
    }

    #[test]
    fn templates_write_the_formats_they_name() {
        let chatml = ChatTemplate::ChatMl {
            default_system: Some("Be brief.".into()),
        };
        assert_eq!(
            chatml.render(&conversation(), true),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?\
             <|im_end|>\n<|im_start|>assistant\n"
        );
        let mut with_system = vec![Message::new(Role::System, "S")];
        with_system.extend(conversation());
        assert_eq!(
            ChatTemplate::Llama2.render(&with_system, true),
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Capital of France? [/INST]"
        );
        assert_eq!(
            ChatTemplate::HumanResponse.render(&conversation()[2..], true),
            "### HUMAN:\nCapital of France?\n\n### RESPONSE:\n"
        );
        assert!(
            ChatTemplate::Alpaca
                .render(&conversation()[2..], true)
                .ends_with("### Instruction:\nCapital of France?\n\n### Response:\n")
        );
    }

    #[test]
    fn the_smollm2_jinja_template_is_chatml_with_its_system_prompt() {
        let jinja = "{% for message in messages %}{% if loop.first and messages[0]['role'] != \
                     'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named \
                     SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}";
        assert_eq!(
            ChatTemplate::from_jinja(jinja),
            Some(ChatTemplate::ChatMl {
                default_system: Some(
                    "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
                )
            })
        );
    }
}
