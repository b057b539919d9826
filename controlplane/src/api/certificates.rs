//! `GET /api/v1/ca/root`, `POST /api/v1/certificates`, `GET /api/v1/certificates`.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::ca::{IssueRequest, MAX_CSR_BYTES};

const PEM_CONTENT_TYPE: &str = "application/x-pem-file";
/// Most audit entries one response returns.
const MAX_AUDIT_ENTRIES: usize = 1000;

pub async fn root(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PEM_CONTENT_TYPE)],
        state.issuer.ca().roots_pem(),
    )
}

#[derive(Debug, Deserialize)]
pub struct IssueParams {
    ttl: Option<String>,
    format: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IssuedJson {
    identity: String,
    serial: String,
    #[serde(with = "time::serde::rfc3339")]
    not_before: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    not_after: time::OffsetDateTime,
    cert_chain: Vec<String>,
}

pub async fn issue(
    State(state): State<ApiState>,
    params: Result<Query<IssueParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Who is asking comes first, from the headers alone: an unauthenticated
    // client must not make us wait for, or buffer, a body.
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default());
    let caller = match state.auth.authenticate_header(authorization).await {
        Ok(caller) => caller,
        Err(e) => {
            discard_briefly(body).await;
            return Err(e.into());
        }
    };
    // An oversized body is drained (up to a bound) before answering: answering
    // before the upload ends makes HTTP/2 clients such as curl report a stream
    // error instead of our JSON. The whole read is bounded in time.
    let timeout = state.options.body_read_timeout;
    let csr = match tokio::time::timeout(timeout, read_bounded(body)).await {
        Ok(csr) => csr?,
        Err(_) => {
            state.metrics.limits.request_refused("body_timeout");
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(timeout)
                ),
            ));
        }
    };
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let json = match params.format.as_deref() {
        None | Some("pem") => false,
        Some("json") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown format {other:?}: use pem or json"
            )));
        }
    };
    let ttl = params
        .ttl
        .as_deref()
        .map(|raw| {
            humantime::parse_duration(raw.trim())
                .map_err(|e| format!("invalid ttl {raw:?}: {e}; e.g. ?ttl=3600s"))
        })
        .transpose()
        .map_err(ApiError::bad_request)?;
    if ttl.is_some_and(|t| t.is_zero()) {
        return Err(ApiError::bad_request(
            "ttl must be positive, e.g. ?ttl=3600s",
        ));
    }

    let issued = state.issuer.issue(
        &caller,
        IssueRequest {
            csr_pem: &csr,
            ttl,
            impersonate: None,
            via: "rest",
        },
    )?;
    if json {
        Ok(Json(IssuedJson {
            identity: issued.subject,
            serial: issued.serial,
            not_before: issued.not_before,
            not_after: issued.not_after,
            cert_chain: issued.chain_pem,
        })
        .into_response())
    } else {
        Ok((
            [
                (header::CONTENT_TYPE, PEM_CONTENT_TYPE.to_owned()),
                (
                    header::HeaderName::from_static("x-certificate-not-after"),
                    issued
                        .not_after
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                ),
            ],
            issued.chain_pem.concat(),
        )
            .into_response())
    }
}

#[derive(Serialize)]
struct RecentJson {
    certificates: Vec<crate::ca::audit::AuditEntry>,
}

pub async fn recent(State(state): State<ApiState>) -> impl IntoResponse {
    Json(RecentJson {
        certificates: state.issuer.audit().recent(MAX_AUDIT_ENTRIES),
    })
}

/// Longest a refused request's body is read (and thrown away) before the
/// refusal is sent.
const REFUSAL_DRAIN_TIME: Duration = Duration::from_millis(200);

/// Lets a refused client finish an upload already on its way, without
/// keeping any of it: an HTTP/2 answer that overtakes the request's last DATA
/// frame makes curl report "Stream error in the HTTP/2 framing layer" instead
/// of our JSON (3 of 4 times on loopback). The bounds (a CSR's size, a fifth
/// of a second) keep a client that sends nothing, or too much, from holding
/// us longer than that.
async fn discard_briefly(mut body: Body) {
    let _ = tokio::time::timeout(REFUSAL_DRAIN_TIME, async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen > MAX_CSR_BYTES {
                    return;
                }
            }
        }
    })
    .await;
}

/// Most bytes of an oversized body we read and throw away before answering 413.
const MAX_DRAIN_BYTES: usize = 1024 * 1024;

/// Reads at most [`MAX_CSR_BYTES`]; a larger body is a 413.
async fn read_bounded(mut body: Body) -> Result<bytes::Bytes, ApiError> {
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= MAX_CSR_BYTES {
                buf.extend_from_slice(&data);
            } else if seen > MAX_DRAIN_BYTES {
                break;
            }
        }
    }
    if seen > MAX_CSR_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the CSR must be at most 64 KiB ({MAX_CSR_BYTES} bytes)"),
        ));
    }
    Ok(buf.freeze())
}
