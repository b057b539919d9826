//! Tells the control plane which pods this node has captured (meshbox's own
//! `CaptureStatusService/Report`), so an operator sees capture state in
//! `GET /api/v1/dataplanes` without logging into the node.
//!
//! Each report is the whole state; it is sent when the state changes, and
//! again every [`REFRESH`] so a restarted control plane learns it too. A
//! control plane without this service (istiod) answers `Unimplemented`:
//! reporting then stops, with one log line. Reporting is best effort and
//! never affects capture itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbox_proto::meshbox::capture_status_service_client::CaptureStatusServiceClient;
use meshbox_proto::meshbox::{CaptureReport, PodCapture};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info};

use super::{Agent, PodStatus};
use crate::token::TokenFile;

const REFRESH: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(500);

pub fn spawn(
    agent: Arc<Agent>,
    channel: Channel,
    token: Option<TokenFile>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut client = CaptureStatusServiceClient::new(channel);
        let mut sent: Option<(Vec<PodStatus>, Instant)> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let now = agent.status();
            let due = match &sent {
                Some((last, at)) => *last != now || at.elapsed() >= REFRESH,
                None => true,
            };
            if !due {
                continue;
            }
            let mut request = tonic::Request::new(CaptureReport {
                pods: now.iter().map(to_wire).collect(),
            });
            request.set_timeout(Duration::from_secs(5));
            if let Some(token) = &token
                && let Err(error) = token.authorize(&mut request).await
            {
                debug!(%error, "no usable token; not reporting capture state");
                continue;
            }
            match client.report(request).await {
                Ok(_) => sent = Some((now, Instant::now())),
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    info!(
                        "the control plane does not take capture reports (not meshbox?); pod capture state is only in /config_dump"
                    );
                    return;
                }
                Err(status) => {
                    debug!(code = ?status.code(), message = status.message(), "capture report not delivered; retrying");
                    // Retry soon, but not in a tight loop.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    });
}

fn to_wire(pod: &PodStatus) -> PodCapture {
    PodCapture {
        uid: pod.uid.clone(),
        state: pod.state.to_owned(),
        ips: pod.ips.iter().map(|ip| ip.to_string()).collect(),
        netns: pod.netns.clone().unwrap_or_default(),
        error: pod.error.clone().unwrap_or_default(),
    }
}
