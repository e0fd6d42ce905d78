//! placeholder
use crate::Settings;
pub struct Output {
    pub markdown: String,
    pub json: serde_json::Value,
}
pub fn run(_s: &Settings) -> anyhow::Result<Output> {
    Ok(Output {
        markdown: String::new(),
        json: serde_json::Value::Null,
    })
}
