//! Request-side types shared by the API dialects: typed access to JSON request fields
//! (unknown fields ignored, wrong types → 400 in the API's own shape), model aliases,
//! thinking-mode resolution and sampling parameters (spec server.md §4.1, §5.4).

pub mod content;

use serde_json::{Map, Value};

use ds4_engine::request::SamplingParams;

use crate::errors::{Api, ApiError, ApiResult};

/// Context needed for think-max (spec §2.4).
pub const THINK_MAX_MIN_CTX: u32 = 393_216;

/// The model id we advertise.
pub const MODEL_ID: &str = "deepseek-v4-flash";

/// Parses a request body: must be a JSON object.
pub fn parse_object(api: Api, bytes: &[u8]) -> ApiResult<Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            api,
            "request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(
            api,
            format!("invalid JSON request: {e}"),
        )),
    }
}

/// Typed, validating view of a JSON object.
#[derive(Clone, Copy)]
pub struct Fields<'a> {
    pub obj: &'a Map<String, Value>,
    pub api: Api,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl<'a> Fields<'a> {
    pub fn new(obj: &'a Map<String, Value>, api: Api) -> Self {
        Self { obj, api }
    }

    /// The value, treating an explicit `null` like an absent field.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn type_error(&self, key: &str, expected: &str, got: &Value) -> ApiError {
        ApiError::bad_request(
            self.api,
            format!(
                "invalid type for '{key}': expected {expected}, got {}",
                type_name(got)
            ),
        )
    }

    pub fn f64(&self, key: &str) -> ApiResult<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(self.type_error(key, "number", v)),
        }
    }

    /// Integer field: fraction truncated, negative → 0, clamped to `i32::MAX`.
    pub fn u32(&self, key: &str) -> ApiResult<Option<u32>> {
        Ok(self.f64(key)?.map(|x| {
            if x.is_nan() || x <= 0.0 {
                0
            } else {
                x.min(i32::MAX as f64) as u32
            }
        }))
    }

    pub fn bool(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.type_error(key, "boolean", v)),
        }
    }

    pub fn str(&self, key: &str) -> ApiResult<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_error(key, "string", v)),
        }
    }

    pub fn array(&self, key: &str) -> ApiResult<Option<&'a Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.type_error(key, "array", v)),
        }
    }

    pub fn object(&self, key: &str) -> ApiResult<Option<Fields<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(Fields::new(o, self.api))),
            Some(v) => Err(self.type_error(key, "object", v)),
        }
    }

    /// Stop sequences: a string or an array of strings (empty strings ignored).
    pub fn stop_list(&self, key: &str) -> ApiResult<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(if s.is_empty() {
                vec![]
            } else {
                vec![s.clone()]
            }),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Value::String(s) if !s.is_empty() => out.push(s.clone()),
                        Value::String(_) => {}
                        v => return Err(self.type_error(key, "string or array of strings", v)),
                    }
                }
                Ok(out)
            }
            Some(v) => Err(self.type_error(key, "string or array of strings", v)),
        }
    }
}

/// The model names we answer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelAlias {
    /// `deepseek-v4-flash`: thinking by default.
    Flash,
    /// `deepseek-chat`: no thinking unless asked.
    Chat,
    /// `deepseek-reasoner`: thinking.
    Reasoner,
}

impl ModelAlias {
    pub fn default_thinking(self) -> bool {
        !matches!(self, Self::Chat)
    }
}

/// Resolves `model`. Unknown names are a 404 unless the server accepts any name
/// (`--any-model`, for clients with hard-coded model names); those behave like Flash.
pub fn resolve_model(api: Api, name: &str, accept_any: bool) -> ApiResult<ModelAlias> {
    match name {
        MODEL_ID => Ok(ModelAlias::Flash),
        "deepseek-chat" => Ok(ModelAlias::Chat),
        "deepseek-reasoner" => Ok(ModelAlias::Reasoner),
        _ if accept_any => Ok(ModelAlias::Flash),
        _ => Err(ApiError::new(
            api,
            axum::http::StatusCode::NOT_FOUND,
            format!("The model '{name}' does not exist; available: {MODEL_ID}, deepseek-chat, deepseek-reasoner"),
        )
        .with_param("model")
        .with_code("model_not_found")),
    }
}

/// Reasoning effort names (spec §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    None,
    High,
    Max,
}

pub fn parse_effort(api: Api, key: &str, v: &str) -> ApiResult<Effort> {
    match v {
        "max" => Ok(Effort::Max),
        "xhigh" | "high" | "medium" | "low" | "minimal" => Ok(Effort::High),
        "none" => Ok(Effort::None),
        other => Err(ApiError::bad_request(
            api,
            format!("invalid value for '{key}': unknown reasoning effort '{other}'"),
        )
        .with_param("reasoning_effort")),
    }
}

/// `thinking: true|false|{"type":"enabled"|"disabled"|…}`; other forms ignored.
pub fn thinking_control(f: &Fields<'_>) -> ApiResult<Option<bool>> {
    match f.get("thinking") {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::Object(o)) => Ok(match o.get("type").and_then(Value::as_str) {
            Some("enabled") | Some("adaptive") => Some(true),
            Some("disabled") => Some(false),
            _ => None,
        }),
        Some(v) => Err(f.type_error("thinking", "boolean or object", v)),
    }
}

/// Final thinking mode of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkMode {
    pub enabled: bool,
    pub max: bool,
}

pub fn resolve_thinking(
    alias: ModelAlias,
    explicit: Option<bool>,
    effort: Option<Effort>,
    ctx: u32,
) -> ThinkMode {
    let enabled = explicit.unwrap_or(alias.default_thinking()) && effort != Some(Effort::None);
    ThinkMode {
        enabled,
        max: enabled && effort == Some(Effort::Max) && ctx >= THINK_MAX_MIN_CTX,
    }
}

/// Sampling knobs; thinking mode forces the defaults (spec §4.1).
pub fn sampling(
    f: &Fields<'_>,
    thinking: bool,
    allow_top_k: bool,
    allow_min_p_seed: bool,
) -> ApiResult<SamplingParams> {
    let mut p = SamplingParams::default();
    let temperature = f.f64("temperature")?;
    let top_p = f.f64("top_p")?;
    let top_k = if allow_top_k { f.u32("top_k")? } else { None };
    let (min_p, seed) = if allow_min_p_seed {
        (f.f64("min_p")?, f.f64("seed")?)
    } else {
        (None, None)
    };
    if let Some(s) = seed
        && s >= 1.0
    {
        p.seed = Some(s.min(u64::MAX as f64) as u64);
    }
    if thinking {
        return Ok(p);
    }
    if let Some(t) = temperature {
        p.temperature = t.max(0.0) as f32;
    }
    if let Some(t) = top_p {
        p.top_p = if t <= 0.0 || t > 1.0 { 1.0 } else { t as f32 };
    }
    if let Some(k) = top_k {
        p.top_k = k;
    }
    if let Some(m) = min_p {
        p.min_p = m.max(0.0) as f32;
    }
    Ok(p)
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn typed_fields_reject_wrong_types_and_ignore_null() {
        let m = obj(json!({"a": 1.9, "b": "x", "c": null, "d": -5, "s": ["x", ""], "t": [1]}));
        let f = Fields::new(&m, Api::OpenAi);
        assert_eq!(f.u32("a").unwrap(), Some(1));
        assert_eq!(f.u32("d").unwrap(), Some(0));
        assert!(f.f64("b").is_err());
        assert_eq!(f.f64("c").unwrap(), None);
        assert!(f.bool("a").is_err());
        assert_eq!(f.stop_list("s").unwrap(), vec!["x".to_string()]);
        assert!(f.stop_list("t").is_err());
        assert_eq!(f.stop_list("b").unwrap(), vec!["x".to_string()]);
    }

    #[test]
    fn thinking_resolution() {
        let ctx = 32768;
        assert!(resolve_thinking(ModelAlias::Flash, None, None, ctx).enabled);
        assert!(!resolve_thinking(ModelAlias::Chat, None, Some(Effort::High), ctx).enabled);
        assert!(resolve_thinking(ModelAlias::Chat, Some(true), None, ctx).enabled);
        assert!(!resolve_thinking(ModelAlias::Reasoner, None, Some(Effort::None), ctx).enabled);
        assert!(!resolve_thinking(ModelAlias::Flash, None, Some(Effort::Max), ctx).max);
        assert!(
            resolve_thinking(
                ModelAlias::Flash,
                None,
                Some(Effort::Max),
                THINK_MAX_MIN_CTX
            )
            .max
        );
        assert!(parse_effort(Api::OpenAi, "reasoning_effort", "banana").is_err());
        let m = obj(json!({"thinking": {"type": "disabled", "budget_tokens": 5}}));
        assert_eq!(
            thinking_control(&Fields::new(&m, Api::Anthropic)).unwrap(),
            Some(false)
        );
    }

    #[test]
    fn sampling_forced_in_thinking() {
        let m = obj(json!({"temperature": 0.2, "top_k": 5, "seed": 7}));
        let f = Fields::new(&m, Api::OpenAi);
        let p = sampling(&f, true, true, true).unwrap();
        assert_eq!((p.temperature, p.top_k, p.seed), (1.0, 0, Some(7)));
        let p = sampling(&f, false, true, true).unwrap();
        assert_eq!((p.temperature, p.top_k), (0.2, 5));
        assert!(resolve_model(Api::OpenAi, "gpt-4", false).is_err());
        assert_eq!(
            resolve_model(Api::OpenAi, "gpt-4", true).unwrap(),
            ModelAlias::Flash
        );
    }
}
