//! The API layer: the only code that knows protobuf/tonic. Conversions between `capybara_proto`
//! and domain types live here (`From`/`TryFrom`), so the service layer speaks domain types only.

mod convert;

pub use convert::{
    ConvertError, counter_to_proto, drop_reason_from_proto, drop_reason_to_proto,
    peer_stats_to_proto,
};
