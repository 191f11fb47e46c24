//! Device maps given by the user: each placement unit's device, read from a plan that
//! `weightsmith plan --json` printed (perhaps edited), or from an accelerate / transformers
//! `device_map` (module name → GPU index, `"cuda:N"` or `"cpu"`), such as
//! `plan --export accelerate` prints or `accelerate.infer_auto_device_map` returns.
//!
//! A unit is placed whole (a layer with its KV cache): a map that sends parts of one layer to
//! different devices is refused, naming the layer and the modules.

use std::collections::BTreeMap;

use planner::Placement;
use serde_json::Value;

use crate::{Error, Result};

/// A device map as the user gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMap {
    /// Unit name (`embed`, `layers.3`, `head`) → place, from a plan document's `units`.
    Units(BTreeMap<String, Placement>),
    /// Module name (`model.layers.3`, `lm_head`, `""` for all) → place, accelerate's form.
    Modules(BTreeMap<String, Placement>),
}

impl DeviceMap {
    /// Parses a device map from JSON: a plan document (an object with `units`, each with
    /// `name` and `device`) or an accelerate map (an object of module → device).
    pub fn from_json(text: &str) -> Result<DeviceMap> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| usage(format!("the device map is not JSON: {e}")))?;
        let Value::Object(object) = value else {
            return Err(usage(
                "the device map must be a JSON object (a plan, or module → device)".into(),
            ));
        };
        if let Some(units) = object.get("units") {
            let Value::Array(units) = units else {
                return Err(usage("the device map's \"units\" must be a list".into()));
            };
            let mut map = BTreeMap::new();
            for (i, unit) in units.iter().enumerate() {
                let name = unit
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| usage(format!("the device map's units[{i}] has no \"name\"")))?;
                let device = unit.get("device").ok_or_else(|| {
                    usage(format!(
                        "the device map's unit \"{name}\" has no \"device\""
                    ))
                })?;
                if map
                    .insert(name.to_string(), placement(name, device)?)
                    .is_some()
                {
                    return Err(usage(format!("the device map names unit \"{name}\" twice")));
                }
            }
            return Ok(DeviceMap::Units(map));
        }
        let mut map = BTreeMap::new();
        for (module, device) in &object {
            map.insert(module.clone(), placement(module, device)?);
        }
        Ok(DeviceMap::Modules(map))
    }

    /// Each unit's place, in `units` order. `modules` gives the modules of each unit (as
    /// accelerate names them). Device indices are checked by the planner.
    pub(crate) fn resolve(
        &self,
        units: &[String],
        modules: &BTreeMap<String, Vec<String>>,
    ) -> Result<Vec<Placement>> {
        match self {
            DeviceMap::Units(map) => {
                if let Some(extra) = map.keys().find(|k| !units.contains(k)) {
                    return Err(usage(format!(
                        "the device map names unit \"{extra}\", which this model does not have (its units: {})",
                        summary(units)
                    )));
                }
                units
                    .iter()
                    .map(|u| {
                        map.get(u).copied().ok_or_else(|| {
                            usage(format!("the device map gives no device for unit \"{u}\""))
                        })
                    })
                    .collect()
            }
            DeviceMap::Modules(map) => units
                .iter()
                .map(|u| {
                    let names = modules.get(u).map(Vec::as_slice).unwrap_or_default();
                    module_placement(map, u, names)
                })
                .collect(),
        }
    }
}

/// The place of a unit whose modules are `names`: each module's device is the map's entry for
/// it or its nearest parent (`""` covers all), and any entries for its sub-modules must agree.
fn module_placement(
    map: &BTreeMap<String, Placement>,
    unit: &str,
    names: &[String],
) -> Result<Placement> {
    let mut found: Option<(Placement, String)> = None;
    for module in names {
        let parent = map
            .iter()
            .filter(|(k, _)| {
                k.is_empty()
                    || *k == module
                    || module
                        .strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            .max_by_key(|(k, _)| k.len());
        let children = map.iter().filter(|(k, _)| {
            k.strip_prefix(module.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        });
        let mut any = false;
        for (key, &place) in parent.into_iter().chain(children) {
            any = true;
            match &found {
                None => found = Some((place, key.clone())),
                Some((seen, seen_key)) if *seen != place => {
                    return Err(usage(format!(
                        "the device map splits unit \"{unit}\": \"{seen_key}\" on {} but \"{key}\" on {}; weightsmith places a layer and its KV cache whole",
                        shown(*seen),
                        shown(place)
                    )))
                }
                Some(_) => {}
            }
        }
        if !any {
            return Err(usage(format!(
                "the device map gives no device for module \"{module}\" (unit \"{unit}\")"
            )));
        }
    }
    found.map(|(p, _)| p).ok_or_else(|| {
        usage(format!(
            "the device map gives no device for unit \"{unit}\""
        ))
    })
}

fn placement(key: &str, device: &Value) -> Result<Placement> {
    let bad = || {
        usage(format!(
            "the device map puts \"{key}\" on {device}: give a GPU index, \"cuda:N\", or \"cpu\""
        ))
    };
    match device {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Placement::Device)
            .ok_or_else(bad),
        Value::String(s) => match s.as_str() {
            "cpu" | "host" => Ok(Placement::Host),
            "cuda" => Ok(Placement::Device(0)),
            "disk" | "meta" => Err(usage(format!(
                "the device map puts \"{key}\" on \"{s}\"; weightsmith loads every weight into memory: put it on a GPU or \"cpu\""
            ))),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(Placement::Device)
                .ok_or_else(bad),
        },
        _ => Err(bad()),
    }
}

fn shown(p: Placement) -> String {
    match p {
        Placement::Host => "cpu".into(),
        Placement::Device(d) => format!("device {d}"),
    }
}

fn summary(units: &[String]) -> String {
    match units {
        [] => "none".into(),
        [one] => one.clone(),
        [first, .., last] => format!("{first} … {last}"),
    }
}

fn usage(message: String) -> Error {
    Error::Usage(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules() -> (Vec<String>, BTreeMap<String, Vec<String>>) {
        let units: Vec<String> = ["embed", "layers.0", "layers.1", "norm", "head"]
            .map(String::from)
            .to_vec();
        let mut m = BTreeMap::new();
        m.insert("embed".into(), vec!["model.embed_tokens".into()]);
        m.insert("layers.0".into(), vec!["model.layers.0".into()]);
        m.insert("layers.1".into(), vec!["model.layers.1".into()]);
        m.insert("norm".into(), vec!["model.norm".into()]);
        m.insert("head".into(), vec!["lm_head".into()]);
        (units, m)
    }

    #[test]
    fn accelerate_maps_resolve_through_parents_and_children() {
        let (units, m) = modules();
        let map = DeviceMap::from_json(
            r#"{"model.embed_tokens": "cpu", "model.layers.0": 0, "model.layers.1.self_attn": "cuda:1",
                "model.layers.1.mlp": 1, "model": 1, "lm_head": "cuda", "model.rotary_emb": 0}"#,
        )
        .unwrap();
        let got = map.resolve(&units, &m).unwrap();
        use Placement::*;
        assert_eq!(got, vec![Host, Device(0), Device(1), Device(1), Device(0)]);
        let all = DeviceMap::from_json(r#"{"": 0}"#).unwrap();
        assert_eq!(all.resolve(&units, &m).unwrap(), vec![Device(0); 5]);
    }

    #[test]
    fn a_layer_split_across_devices_is_refused_naming_it() {
        let (units, m) = modules();
        let map = DeviceMap::from_json(
            r#"{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1.self_attn": 0,
                "model.layers.1.mlp": 1, "model.norm": 1, "lm_head": 1}"#,
        )
        .unwrap();
        let e = map.resolve(&units, &m).unwrap_err().to_string();
        assert!(e.contains("splits unit \"layers.1\""), "{e}");
        assert!(e.contains("model.layers.1.mlp"), "{e}");
    }

    #[test]
    fn plan_documents_resolve_by_unit_name_and_refuse_unknown_or_missing_units() {
        let (units, m) = modules();
        let plan = r#"{"units": [{"name": "embed", "device": 0}, {"name": "layers.0", "device": 0},
            {"name": "layers.1", "device": 1}, {"name": "norm", "device": 1}, {"name": "head", "device": "host"}]}"#;
        use Placement::*;
        assert_eq!(
            DeviceMap::from_json(plan)
                .unwrap()
                .resolve(&units, &m)
                .unwrap(),
            vec![Device(0), Device(0), Device(1), Device(1), Host]
        );
        let missing = r#"{"units": [{"name": "embed", "device": 0}]}"#;
        let e = DeviceMap::from_json(missing)
            .unwrap()
            .resolve(&units, &m)
            .unwrap_err();
        assert!(
            e.to_string().contains("no device for unit \"layers.0\""),
            "{e}"
        );
        let unknown = r#"{"units": [{"name": "layers.9", "device": 0}]}"#;
        let e = DeviceMap::from_json(unknown)
            .unwrap()
            .resolve(&units, &m)
            .unwrap_err();
        assert!(e.to_string().contains("\"layers.9\""), "{e}");
        let m2 = BTreeMap::new();
        let e = DeviceMap::from_json(r#"{"model.layers.0": 0}"#)
            .unwrap()
            .resolve(&units, &m2)
            .unwrap_err();
        assert!(
            e.to_string().contains("no device for unit \"embed\""),
            "{e}"
        );
    }

    #[test]
    fn bad_devices_are_refused_naming_the_key() {
        for (text, needle) in [
            (r#"{"lm_head": "disk"}"#, "\"lm_head\" on \"disk\""),
            (r#"{"lm_head": -1}"#, "\"lm_head\" on -1"),
            (r#"{"lm_head": "cuda:x"}"#, "\"lm_head\" on \"cuda:x\""),
            (r#"{"lm_head": [0]}"#, "\"lm_head\" on [0]"),
            (r#"[1]"#, "must be a JSON object"),
            (r#"{"units": 3}"#, "must be a list"),
            (r#"{"units": [{"device": 0}]}"#, "units[0] has no \"name\""),
            ("{", "not JSON"),
        ] {
            let e = DeviceMap::from_json(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
