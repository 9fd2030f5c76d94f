//! The demo rules: a depot zone around the fleet and a cold-chain temperature range, watching the
//! simulated devices only, so the rogues raise `LeftZone` and `TemperatureOutOfRange` alarms.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use reqwest::Client;
use serde_json::{json, Value};

use crate::fleet::{GeoPoint, COLD_CHAIN_MAX_C, COLD_CHAIN_MIN_C, ZONE_RADIUS_M};
use crate::http::{api_url, describe_response, with_token};

pub const ZONE_ID: &str = "sim-depot";
pub const RANGE_ID: &str = "sim-cold-chain";

/// The zone: a circle of [`ZONE_RADIUS_M`] around the fleet's centre.
pub fn zone_body(centre: GeoPoint, devices: &[&str]) -> Value {
    json!({
        "id": ZONE_ID,
        "name": "fleetwatch-sim depot",
        "shape": {"type": "circle", "center": centre, "radius_m": ZONE_RADIUS_M},
        "devices": devices,
    })
}

/// The range: 2..8 °C.
pub fn range_body(devices: &[&str]) -> Value {
    json!({
        "id": RANGE_ID,
        "name": "fleetwatch-sim cold chain",
        "min": COLD_CHAIN_MIN_C,
        "max": COLD_CHAIN_MAX_C,
        "devices": devices,
    })
}

/// Creates or replaces both rules, with the engine's admin `token` if given; each request fails
/// after `timeout`.
pub async fn define_rules(
    client: &Client,
    base_url: &str,
    token: Option<&str>,
    centre: GeoPoint,
    devices: &[&str],
    timeout: Duration,
) -> Result<()> {
    let zone_url = api_url(base_url, &format!("/api/zones/{ZONE_ID}"));
    put(
        client,
        &zone_url,
        token,
        &zone_body(centre, devices),
        timeout,
    )
    .await
    .with_context(|| format!("cannot define the zone {ZONE_ID}"))?;
    let range_url = api_url(base_url, &format!("/api/temperature-ranges/{RANGE_ID}"));
    put(client, &range_url, token, &range_body(devices), timeout)
        .await
        .with_context(|| format!("cannot define the temperature range {RANGE_ID}"))?;
    Ok(())
}

async fn put(
    client: &Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
    timeout: Duration,
) -> Result<()> {
    let response = with_token(client.put(url), token)
        .timeout(timeout)
        .json(body)
        .send()
        .await
        .with_context(|| format!("PUT {url}"))?;
    if !response.status().is_success() {
        bail!("PUT {url}: {}", describe_response(response).await);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_watch_only_the_simulated_devices() {
        let centre = GeoPoint {
            lat: 52.37,
            lon: 4.89,
        };
        let zone = zone_body(centre, &["sim-00001", "sim-00002"]);
        assert_eq!(zone["shape"]["type"], "circle");
        assert_eq!(zone["shape"]["center"]["lat"], 52.37);
        assert_eq!(zone["shape"]["radius_m"], ZONE_RADIUS_M);
        assert_eq!(zone["devices"], json!(["sim-00001", "sim-00002"]));
        let range = range_body(&["sim-00001"]);
        assert_eq!(
            (range["min"].as_f64(), range["max"].as_f64()),
            (Some(2.0), Some(8.0))
        );
    }
}
