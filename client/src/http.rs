//! The HTTP side of the client: one method per endpoint of docs/client-api.md.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use proto::{ApiError, DeviceId, ErrorCode, UserId};
use serde::Deserialize;

use crate::ClientError;

const MLS: &str = "message/mls";

#[derive(Debug, Clone, Deserialize)]
pub struct Accepted {
    pub group: String,
    pub position: u64,
    pub epoch: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClaimedKeyPackage {
    pub device: String,
    pub cipher_suite: u16,
    pub last_resort: bool,
    pub key_package: String,
}

/// A mailbox item or a group entry (the fields of docs/client-api.md).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Item {
    /// Mailbox items: the mailbox cursor. Group entries: the group cursor.
    pub seq: u64,
    #[serde(default)]
    pub group: Option<String>,
    pub position: u64,
    pub epoch: u64,
    pub kind: String,
    pub own: bool,
    pub message: String,
    #[serde(default)]
    pub notice: Option<serde_json::Value>,
    /// Group entries: the position of the entry before this one here.
    #[serde(default)]
    pub prev_position: u64,
    /// Welcomes: the group cursor to read the group's entries after.
    #[serde(default)]
    pub group_seq: Option<u64>,
}

/// One WebSocket frame from the operator.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    Mailbox(Item),
    Entry(Item),
    /// Several entries in one frame, in order (a socket opened with
    /// [`Http::websocket_batched`]).
    Entries {
        entries: Vec<Item>,
    },
    /// A submission sent on the socket ([`submit_frame`]) was accepted.
    Accepted {
        #[serde(rename = "ref")]
        reference: u64,
        group: String,
        position: u64,
        epoch: u64,
    },
    /// With `reference`: the answer to that submission (never naming a
    /// group). With `group`: the socket no longer follows that group.
    Error {
        group: Option<String>,
        code: ErrorCode,
        message: String,
        #[serde(default, rename = "ref")]
        reference: Option<u64>,
        #[serde(default)]
        current_epoch: Option<u64>,
        #[serde(default)]
        winning_commit_position: Option<u64>,
    },
}

/// The binary WebSocket frame that submits `bundle` (what `POST
/// /v1/messages` takes) under `reference`, which the answer frame repeats.
pub fn submit_frame(reference: u64, bundle: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + bundle.len());
    frame.extend_from_slice(&reference.to_be_bytes());
    frame.extend_from_slice(bundle);
    frame
}

/// A device's WebSocket to its operator.
pub type WebSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One read of a group's entries.
#[derive(Debug, Clone, Deserialize)]
pub struct Page {
    pub entries: Vec<Item>,
    pub next: u64,
}

/// The last entry of one of the device's groups (the sync answer).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct GroupHead {
    pub group: String,
    pub seq: u64,
    pub position: u64,
    #[serde(default)]
    pub removed_at: Option<u64>,
}

#[derive(Deserialize)]
struct Heads {
    groups: Vec<GroupHead>,
}

impl Item {
    pub fn bytes(&self) -> Result<Vec<u8>, ClientError> {
        B64.decode(&self.message).map_err(|e| ClientError::Protocol(format!("bad base64 in item: {e}")))
    }
}

#[derive(Debug, Deserialize)]
struct Fetched {
    items: Vec<Item>,
}

/// A thin, typed HTTP client for one device. `https://` operators are
/// reached over rustls, trusting the bundled web PKI roots plus any root
/// added with [`Http::trust_roots_pem`] (an operator's private CA).
/// `GET /v1/groups/{group}/group_info`.
#[derive(Debug, Clone, Deserialize)]
pub struct GroupInfoAnswer {
    pub group: String,
    pub epoch: u64,
    pub position: u64,
    /// base64 MLSMessage(GroupInfo).
    pub group_info: String,
}

#[derive(Clone)]
pub struct Http {
    base: String,
    token: String,
    device: DeviceId,
    client: reqwest::Client,
    /// Extra trusted roots (DER), also used by the WebSocket.
    roots: Vec<rustls_pki_types::CertificateDer<'static>>,
}

fn build_client(roots: &[rustls_pki_types::CertificateDer<'static>]) -> Result<reqwest::Client, ClientError> {
    // An operator closes a keep-alive connection idle for its header read
    // timeout (10 s by default); reusing one it is closing right then fails
    // with a reset. Idle connections are dropped well before that.
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(std::time::Duration::from_secs(60))
        .pool_idle_timeout(std::time::Duration::from_secs(4));
    for r in roots {
        let cert = reqwest::Certificate::from_der(r.as_ref())
            .map_err(|e| ClientError::Protocol(format!("bad root certificate: {e}")))?;
        b = b.add_root_certificate(cert);
    }
    b.build().map_err(|e| ClientError::Protocol(format!("cannot build the HTTP client: {e}")))
}

/// Percent-encodes a path segment (RFC 3986 unreserved characters pass).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Http {
    pub fn new(base: &str, token: &str, device: DeviceId) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            device,
            client: build_client(&[]).unwrap_or_default(),
            roots: Vec::new(),
        }
    }

    /// Also trusts the certificates of `pem` (one or more PEM blocks) as
    /// roots, for an operator whose certificate comes from a private CA.
    pub fn trust_roots_pem(&mut self, pem: &[u8]) -> Result<(), ClientError> {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = self.roots.clone();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
            roots.push(cert.map_err(|e| ClientError::Protocol(format!("bad PEM certificate: {e:?}")))?);
        }
        if roots.len() == self.roots.len() {
            return Err(ClientError::Protocol("no certificate in the PEM".into()));
        }
        self.client = build_client(&roots)?;
        self.roots = roots;
        Ok(())
    }

    /// The rustls configuration of the WebSocket: web PKI roots plus ours.
    fn tls_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, ClientError> {
        let mut store = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for r in &self.roots {
            store.add(r.clone()).map_err(|e| ClientError::Protocol(format!("bad root certificate: {e}")))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(std::sync::Arc::new(cfg))
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    fn mailbox_url(&self) -> String {
        format!("{}/v1/devices/{}/mailbox", self.base, encode_segment(self.device.as_str()))
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => ClientError::Api(e),
            Err(_) => ClientError::Api(ApiError::new(ErrorCode::Internal, format!("HTTP {status}: {text}"))),
        })
    }

    async fn post_mls(&self, path: &str, body: Vec<u8>, key: Option<&str>) -> Result<reqwest::Response, ClientError> {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, MLS)
            .body(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        Self::check(req.send().await?).await
    }

    pub async fn upload_key_packages(&self, body: Vec<u8>) -> Result<serde_json::Value, ClientError> {
        Ok(self.post_mls("/v1/keypackages", body, None).await?.json().await?)
    }

    pub async fn stock(&self) -> Result<serde_json::Value, ClientError> {
        let r = self.client.get(format!("{}/v1/keypackages/stock", self.base)).bearer_auth(&self.token).send().await?;
        Ok(Self::check(r).await?.json().await?)
    }

    pub async fn claim(&self, user: &UserId) -> Result<Vec<ClaimedKeyPackage>, ClientError> {
        #[derive(Deserialize)]
        struct R {
            key_packages: Vec<ClaimedKeyPackage>,
        }
        let r = self
            .client
            .post(format!("{}/v1/keypackages/claim", self.base))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "user": user.as_str() }))
            .send()
            .await?;
        Ok(Self::check(r).await?.json::<R>().await?.key_packages)
    }

    /// The operator's public facts, including its binding key.
    pub async fn operator(&self) -> Result<serde_json::Value, ClientError> {
        let r = self.client.get(format!("{}/v1/operator", self.base)).send().await?;
        Ok(Self::check(r).await?.json().await?)
    }

    /// The operator's signed binding of `device` (also when revoked).
    /// Also returns the key the binding is signed with, as our server names
    /// it (another operator's key for its devices).
    pub async fn binding(&self, device: &DeviceId) -> Result<(proto::identity::SignedBinding, String), ClientError> {
        #[derive(Deserialize)]
        struct B {
            #[serde(flatten)]
            signed: proto::identity::SignedBinding,
            #[serde(default)]
            operator_key: String,
        }
        let r = self
            .client
            .get(format!("{}/v1/identity/{}", self.base, encode_segment(device.as_str())))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let b: B = if r.status() == reqwest::StatusCode::GONE {
            r.json().await?
        } else {
            Self::check(r).await?.json().await?
        };
        Ok((b.signed, b.operator_key))
    }

    pub async fn create_group(&self, group_info: Vec<u8>) -> Result<Accepted, ClientError> {
        Ok(self.post_mls("/v1/groups", group_info, None).await?.json().await?)
    }

    pub async fn submit(&self, bundle: Vec<u8>, key: Option<&str>) -> Result<Accepted, ClientError> {
        Ok(self.post_mls("/v1/messages", bundle, key).await?.json().await?)
    }

    pub async fn fetch(&self, after: u64, limit: usize) -> Result<Vec<Item>, ClientError> {
        let r = self
            .client
            .get(self.mailbox_url())
            .query(&[("after", after.to_string()), ("limit", limit.to_string())])
            .bearer_auth(&self.token)
            .send()
            .await?;
        Ok(Self::check(r).await?.json::<Fetched>().await?.items)
    }

    pub async fn ack(&self, up_to: u64) -> Result<(), ClientError> {
        let r = self
            .client
            .post(format!("{}/ack", self.mailbox_url()))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "up_to": up_to }))
            .send()
            .await?;
        Self::check(r).await?;
        Ok(())
    }

    /// Reads a group's entries after group cursor `after`; `position` (the
    /// last position applied) lets the operator say `history_expired`.
    pub async fn entries(&self, g: &str, after: u64, position: Option<u64>, limit: usize) -> Result<Page, ClientError> {
        let mut query = vec![("after", after.to_string()), ("limit", limit.to_string())];
        if let Some(p) = position {
            query.push(("position", p.to_string()));
        }
        let r = self
            .client
            .get(format!("{}/v1/groups/{}/entries", self.base, encode_segment(g)))
            .query(&query)
            .bearer_auth(&self.token)
            .send()
            .await?;
        Ok(Self::check(r).await?.json::<Page>().await?)
    }

    /// The group's current GroupInfo, to rejoin it by external commit.
    pub async fn group_info(&self, g: &str) -> Result<GroupInfoAnswer, ClientError> {
        let r = self
            .client
            .get(format!("{}/v1/groups/{}/group_info", self.base, encode_segment(g)))
            .bearer_auth(&self.token)
            .send()
            .await?;
        Ok(Self::check(r).await?.json::<GroupInfoAnswer>().await?)
    }

    /// Tells the hub that this device could not process the Commit at
    /// `position`.
    pub async fn report(&self, g: &str, position: u64) -> Result<(), ClientError> {
        let r = self
            .client
            .post(format!("{}/v1/groups/{}/reports", self.base, encode_segment(g)))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "position": position }))
            .send()
            .await?;
        Self::check(r).await?;
        Ok(())
    }

    /// The last entry of each of this device's groups.
    pub async fn groups(&self) -> Result<Vec<GroupHead>, ClientError> {
        let r = self
            .client
            .get(format!("{}/v1/devices/{}/groups", self.base, encode_segment(self.device.as_str())))
            .bearer_auth(&self.token)
            .send()
            .await?;
        Ok(Self::check(r).await?.json::<Heads>().await?.groups)
    }

    /// Opens the WebSocket push channel from mailbox cursor `after`; send
    /// a `follow` frame for the groups to push.
    pub async fn websocket(&self, after: u64) -> Result<WebSocket, ClientError> {
        self.open_websocket(after, false).await
    }

    /// As [`Http::websocket`], with the entries at hand gathered into
    /// [`Frame::Entries`] frames.
    pub async fn websocket_batched(&self, after: u64) -> Result<WebSocket, ClientError> {
        self.open_websocket(after, true).await
    }

    async fn open_websocket(&self, after: u64, batch: bool) -> Result<WebSocket, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let url = format!(
            "{}/v1/devices/{}/ws?after={after}{}",
            self.base,
            encode_segment(self.device.as_str()),
            if batch { "&batch=true" } else { "" }
        )
        .replacen("http", "ws", 1);
        let mut req = url.into_client_request().map_err(|e| ClientError::Protocol(e.to_string()))?;
        let auth = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| ClientError::Protocol("token is not a valid header".into()))?;
        req.headers_mut().insert("authorization", auth);
        let connector = tokio_tungstenite::Connector::Rustls(self.tls_config()?);
        // tungstenite zeroes its whole read buffer (128 KiB by default)
        // before every read; most frames are a few hundred bytes, and a
        // larger one still arrives whole.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 << 10);
        // Nagle off: a submission frame sent right after another would
        // otherwise wait for the operator's delayed ACK (40 ms on Linux).
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, Some(connector))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(ws)
    }
}
