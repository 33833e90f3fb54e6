//! API errors, rendered in the error shape of the API that was called: OpenAI
//! (`{"error":{"message","type","param","code"}}`) or Anthropic
//! (`{"type":"error","error":{"type","message"}}`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Which error dialect a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

/// A request failure with its HTTP status (boxed: it travels through every `?`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError(Box<ErrorInfo>);

#[derive(Debug, Clone, PartialEq)]
pub struct ErrorInfo {
    pub api: Api,
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Extra members of the inner error object (e.g. token counts).
    pub extra: Map<String, Value>,
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    pub fn new(api: Api, status: StatusCode, message: impl Into<String>) -> Self {
        Self(Box::new(ErrorInfo {
            api,
            status,
            message: message.into(),
            param: None,
            code: None,
            extra: Map::new(),
        }))
    }
    pub fn info(&self) -> &ErrorInfo {
        &self.0
    }
    pub fn bad_request(api: Api, message: impl Into<String>) -> Self {
        Self::new(api, StatusCode::BAD_REQUEST, message)
    }
    pub fn with_param(mut self, param: &'static str) -> Self {
        self.0.param = Some(param);
        self
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.0.code = Some(code);
        self
    }

    /// Prompt does not fit the context: message with both token counts.
    pub fn context_length(api: Api, param: &'static str, n_prompt: usize, n_ctx: u32) -> Self {
        let mut e = Self::bad_request(
            api,
            format!(
                "Prompt has {n_prompt} tokens, but the configured context size is {n_ctx} tokens"
            ),
        )
        .with_param(param)
        .with_code("context_length_exceeded");
        e.0.extra.insert("n_prompt_tokens".into(), json!(n_prompt));
        e.0.extra.insert("n_ctx".into(), json!(n_ctx));
        e
    }

    fn openai_type(&self) -> &'static str {
        match self.0.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self.0.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        match self.0.api {
            Api::OpenAi => {
                let mut inner = Map::new();
                inner.insert("message".into(), json!(self.0.message));
                inner.insert("type".into(), json!(self.openai_type()));
                inner.insert("param".into(), json!(self.0.param));
                inner.insert("code".into(), json!(self.0.code));
                inner.extend(self.0.extra.clone());
                json!({ "error": inner })
            }
            Api::Anthropic => {
                let mut inner = Map::new();
                inner.insert("type".into(), json!(self.anthropic_type()));
                inner.insert("message".into(), json!(self.0.message));
                inner.extend(self.0.extra.clone());
                json!({ "type": "error", "error": inner })
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.body().to_string();
        body.push('\n');
        let mut resp = (self.0.status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shapes_per_api() {
        let e = ApiError::context_length(Api::OpenAi, "messages", 40000, 32768);
        let b = e.body();
        assert_eq!(b["error"]["code"], "context_length_exceeded");
        assert_eq!(b["error"]["n_prompt_tokens"], 40000);
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(
            b["error"]["message"],
            "Prompt has 40000 tokens, but the configured context size is 32768 tokens"
        );
        let a = ApiError::new(Api::Anthropic, StatusCode::NOT_FOUND, "nope").body();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "not_found_error");
        assert_eq!(a["error"]["message"], "nope");
        let u = ApiError::new(Api::OpenAi, StatusCode::UNAUTHORIZED, "x").body();
        assert_eq!(u["error"]["type"], "authentication_error");
    }
}
