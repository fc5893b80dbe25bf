//! The AdmissionReview wire format (`admission.k8s.io/v1`, and `v1beta1` answered in kind):
//! parsing a request into a `soma_policy::Review` and building the response.
//!
//! Objects stay `serde_json::Value`s, the form the policy engine consumes, so a request is
//! parsed once and never converted into typed Kubernetes objects.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use soma_policy::{Decision, Review};

use crate::error::AdmissionError;

/// The kinds this webhook decides.
pub const KINDS: &[&str] = &["Agent", "Capsule", "Budget", "Job"];
/// Their API group.
pub const GROUP: &str = "soma.dev";

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    /// `admission.k8s.io/v1` or `admission.k8s.io/v1beta1`, echoed in the response.
    pub api_version: String,
    /// The request's uid, echoed in the response.
    pub uid: String,
    /// The review for the policies.
    pub review: Review,
}

/// Parses an AdmissionReview body.
pub fn parse(body: &[u8]) -> Result<Request, AdmissionError> {
    let mut doc: Value = serde_json::from_slice(body)
        .map_err(|e| AdmissionError::Malformed(format!("not JSON: {e}")))?;
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !matches!(
        api_version.as_str(),
        "admission.k8s.io/v1" | "admission.k8s.io/v1beta1"
    ) {
        return Err(AdmissionError::Malformed(format!(
            "apiVersion must be admission.k8s.io/v1, got {api_version:?}"
        )));
    }
    if doc.get("kind").and_then(Value::as_str) != Some("AdmissionReview") {
        return Err(AdmissionError::Malformed(
            "kind must be AdmissionReview".to_owned(),
        ));
    }
    let Some(Value::Object(mut request)) = doc.get_mut("request").map(Value::take) else {
        return Err(AdmissionError::Malformed("request is missing".to_owned()));
    };
    let text = |r: &serde_json::Map<String, Value>, k: &str| {
        r.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let uid = text(&request, "uid");
    if uid.is_empty() {
        return Err(AdmissionError::Malformed(
            "request.uid is missing".to_owned(),
        ));
    }
    let kind = request.get("kind").cloned().unwrap_or(Value::Null);
    let field = |k: &str| {
        kind.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let object = match request.remove("object") {
        Some(Value::Null) | None => Value::Null,
        Some(v) => v,
    };
    let old_object = match request.remove("oldObject") {
        Some(Value::Null) | None => None,
        Some(v) => Some(v),
    };
    let mut name = text(&request, "name");
    if name.is_empty() {
        name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
    }
    let review = Review {
        operation: text(&request, "operation"),
        group: field("group"),
        version: field("version"),
        kind: field("kind"),
        namespace: text(&request, "namespace"),
        name,
        object,
        old_object,
        user_info: request.remove("userInfo").unwrap_or_else(|| json!({})),
        dry_run: request
            .get("dryRun")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    Ok(Request {
        api_version,
        uid,
        review,
    })
}

/// Why a request is refused before any policy runs, if it is.
pub fn precheck(review: &Review) -> Option<String> {
    if review.group != GROUP || !KINDS.contains(&review.kind.as_str()) {
        return Some(format!(
            "Soma's webhook decides {GROUP} {} only; got {:?} in group {:?}. Check the ValidatingWebhookConfiguration's rules",
            KINDS.join(", "),
            review.kind,
            review.group
        ));
    }
    if matches!(review.operation.as_str(), "CREATE" | "UPDATE") && !review.object.is_object() {
        return Some(format!(
            "{} of a {} without an object",
            review.operation, review.kind
        ));
    }
    if review.object.is_object() {
        let kind = review.object.get("kind").and_then(Value::as_str);
        if kind.is_some_and(|k| k != review.kind) {
            return Some(format!(
                "request.kind is {} but the object's kind is {}",
                review.kind,
                kind.unwrap_or_default()
            ));
        }
    }
    None
}

/// The response body.
#[derive(Debug, Default)]
pub struct Response {
    /// Allowed?
    pub allowed: bool,
    /// HTTP-style code in `status.code` (403 for policy denials).
    pub code: u16,
    /// `status.reason`.
    pub reason: &'static str,
    /// `status.message`, shown to the user.
    pub message: String,
    /// `warnings`, shown by kubectl.
    pub warnings: Vec<String>,
    /// `auditAnnotations`.
    pub audit: BTreeMap<String, String>,
}

impl Response {
    /// Allowed, nothing to say.
    pub fn allow() -> Self {
        Self {
            allowed: true,
            code: 200,
            ..Self::default()
        }
    }

    /// Denied with a message.
    pub fn deny(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            allowed: false,
            code,
            reason,
            message,
            ..Self::default()
        }
    }

    /// The response for a policy decision.
    pub fn from_decision(review: &Review, decision: &Decision) -> Self {
        let mut out = if decision.allowed() {
            Self::allow()
        } else {
            let reasons = decision.deny_messages();
            let subject = if review.namespace.is_empty() {
                format!("{} {:?}", review.kind, review.name)
            } else {
                format!(
                    "{} {:?} in namespace {:?}",
                    review.kind, review.name, review.namespace
                )
            };
            Self::deny(
                403,
                "Forbidden",
                format!(
                    "Soma policy denied {subject}: {} violation(s): {}",
                    reasons.len(),
                    reasons.join("; ")
                ),
            )
        };
        out.warnings = decision.warnings();
        out.audit.insert(
            "decision".to_owned(),
            if out.allowed { "allowed" } else { "denied" }.to_owned(),
        );
        if !decision.violations.is_empty() {
            out.audit.insert(
                "violations".to_owned(),
                serde_json::to_string(&decision.violations).unwrap_or_default(),
            );
        }
        if !decision.failures.is_empty() {
            out.audit.insert(
                "evaluation-failures".to_owned(),
                serde_json::to_string(&decision.failures).unwrap_or_default(),
            );
        }
        out
    }

    /// The AdmissionReview JSON.
    pub fn into_review(self, api_version: &str, uid: &str) -> Value {
        let mut response = json!({ "uid": uid, "allowed": self.allowed });
        if let Some(map) = response.as_object_mut() {
            if !self.allowed || !self.message.is_empty() {
                map.insert(
                    "status".to_owned(),
                    json!({
                        "code": self.code,
                        "reason": self.reason,
                        "message": self.message,
                        "status": if self.allowed { "Success" } else { "Failure" },
                    }),
                );
            }
            if !self.warnings.is_empty() {
                map.insert("warnings".to_owned(), json!(self.warnings));
            }
            if !self.audit.is_empty() {
                map.insert("auditAnnotations".to_owned(), json!(self.audit));
            }
        }
        json!({ "apiVersion": api_version, "kind": "AdmissionReview", "response": response })
    }
}

/// Finds the request uid in the edges (first and last bytes) of a body too large to parse, so
/// that even a refused oversized request gets an AdmissionReview the API server can show. The
/// API server writes `request.uid` first; a client that sorts keys writes it last.
pub fn sniff_uid(edges: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(edges);
    let head = text.find("\"request\"").map(|i| &text[i..]);
    head.and_then(uid_after_first).or_else(|| {
        // Last key of the request: nothing but the closing braces may follow its value.
        let at = text.rfind("\"uid\"")?;
        let uid = uid_after_first(&text[at..])?;
        let end = text[at..].find(&format!("\"{uid}\""))? + at + uid.len() + 2;
        let rest: String = text[end..].chars().filter(|c| !c.is_whitespace()).collect();
        (rest == "}}").then_some(uid)
    })
}

fn uid_after_first(text: &str) -> Option<String> {
    let at = text.find("\"uid\"")?;
    // Only if "uid" belongs to the request, not to a nested object before it.
    let before = &text[..at];
    if before.contains("\"object\"") || before.contains("\"oldObject\"") {
        return None;
    }
    let rest = text[at + 5..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let uid: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    (!uid.is_empty()).then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_found_first_or_last_but_never_inside_the_object() {
        let first = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"abc-1","kind":{}"#;
        assert_eq!(sniff_uid(first).as_deref(), Some("abc-1"));
        let last = br#"{"request":{"dryRun":false,"object":{"metadata":{"uid":"obj-uid"}} ... "operation":"CREATE","uid":"req-2"}}"#;
        assert_eq!(sniff_uid(last).as_deref(), Some("req-2"));
        assert_eq!(
            sniff_uid(br#"{"request":{"object":{"metadata":{"uid":"obj","name":"x"#),
            None
        );
        assert_eq!(sniff_uid(b"[[[["), None);
    }

    #[test]
    fn parse_takes_what_the_api_server_sends() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"soma.dev","version":"v1alpha1","kind":"Agent"},"namespace":"ns","operation":"CREATE","object":{"kind":"Agent","metadata":{"name":"a"}}}}"#;
        let r = parse(body).unwrap();
        assert_eq!(
            (
                r.uid.as_str(),
                r.review.name.as_str(),
                r.review.group.as_str()
            ),
            ("u", "a", "soma.dev")
        );
        assert!(precheck(&r.review).is_none());
    }
}
