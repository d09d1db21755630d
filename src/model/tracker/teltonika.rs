//! Teltonika's binary protocol over TCP, as its units (FMB, FMC, FMM, FMT…) speak it: the IMEI handshake and the
//! AVL data packets of Codec 8, Codec 8 Extended and Codec 16, read into [`TrackerFix`]es. Pure: the TCP session
//! (`crate::tcp::teltonika`) finds the packets in the byte stream and answers them.
//!
//! A packet is `00 00 00 00`, the data length (u32), the data — codec, record count, records, record count
//! again — and a CRC-16/IBM of the data in a u32. Each record: time (Unix ms, u64), priority, the GPS element
//! (longitude and latitude in 1e-7 degrees, i32; altitude m, i16; angle, u16; satellites, u8; speed km/h, u16), the
//! event IO id, then the IO elements grouped by value size (1, 2, 4, 8 bytes; Codec 8 Extended adds
//! variable-length ones). Codec 8 writes IO ids and counts in one byte; Codec 8 Extended in two; Codec 16 writes
//! ids in two bytes and counts in one, and a generation type after the event id.
//!
//! Followed: Teltonika's "Codec" wiki pages and traccar/traccar `TeltonikaProtocolDecoder.java` (field order,
//! the attribute names and unit conversions of the IO elements it names for every model). IO elements this
//! table does not name are kept under their numeric id (`"69": 1`), so that nothing a unit sends is lost.

use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use super::TrackerFix;

/// The codec of AVL data with one-byte IO ids and counts.
pub const CODEC_8: u8 = 0x08;
/// The codec of AVL data with two-byte IO ids and counts, and variable-length IO elements.
pub const CODEC_8_EXTENDED: u8 = 0x8E;
/// The codec of AVL data with two-byte IO ids, one-byte counts and a generation type.
pub const CODEC_16: u8 = 0x10;

/// Bytes before a packet's data: four zero bytes and the data length.
pub const HEADER_BYTES: usize = 8;
/// Bytes after a packet's data: the CRC, in a u32.
pub const CRC_BYTES: usize = 4;
/// The shortest data: codec, record count, record count again.
pub const MIN_DATA_BYTES: usize = 3;
/// Bytes of the handshake's length field.
pub const IMEI_LENGTH_BYTES: usize = 2;

/// The answer to a handshake whose IMEI is accepted.
pub const HANDSHAKE_ACCEPTED: u8 = 0x01;
/// The answer to a handshake whose IMEI is refused.
pub const HANDSHAKE_REFUSED: u8 = 0x00;

/// Why a packet's data could not be read: nothing of it is stored or acknowledged (the unit sends it again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The CRC does not match the data: damaged on the way.
    #[error("the CRC is {found:#06x}, the data's is {computed:#06x}")]
    BadCrc { found: u32, computed: u16 },
    /// A codec this reader does not know (Codec 12 and 13 are command answers, which the gateway never asks for).
    #[error("codec {0:#04x} is not AVL data of Codec 8, 8 Extended or 16")]
    UnsupportedCodec(u8),
    /// The data does not hold what its lengths and counts say.
    #[error("{0}")]
    Malformed(&'static str),
}

/// What a reason is counted under.
impl PacketError {
    pub const fn code(&self) -> &'static str {
        match self {
            PacketError::BadCrc { .. } => "bad_crc",
            PacketError::UnsupportedCodec(_) => "unsupported_codec",
            PacketError::Malformed(_) => "malformed",
        }
    }
}

/// CRC-16/IBM (also called CRC-16/ARC): polynomial 0x8005 reflected (0xA001), initial value 0, no final XOR.
pub fn crc16_ibm(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    for byte in data {
        crc ^= u16::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
        }
    }
    crc
}

/// The IMEI of a whole handshake frame (the two length bytes, then the IMEI in ASCII); `None` when its bytes are
/// not printable ASCII.
pub fn read_imei(frame: &[u8]) -> Option<&str> {
    let imei = frame.get(IMEI_LENGTH_BYTES..)?;
    if imei.is_empty() || !imei.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    std::str::from_utf8(imei).ok()
}

/// The answer to an AVL packet: how many of its records the server took, as a big-endian u32.
pub fn records_answer(records: usize) -> [u8; 4] {
    u32::try_from(records).unwrap_or(u32::MAX).to_be_bytes()
}

/// What a packet held.
#[derive(Debug, Clone, PartialEq)]
pub struct AvlPacket {
    pub codec: u8,
    /// One per record, in the order sent.
    pub fixes: Vec<TrackerFix>,
}

/// Reads a whole packet (header, data, CRC) of the unit `imei`. The header's data length must be the packet's;
/// the transport found the packet's end by it.
pub fn decode_packet(packet: &[u8], imei: &str) -> Result<AvlPacket, PacketError> {
    if packet.len() < HEADER_BYTES + MIN_DATA_BYTES + CRC_BYTES || packet[..4] != [0, 0, 0, 0] {
        return Err(PacketError::Malformed("not an AVL data packet"));
    }
    let data = &packet[HEADER_BYTES..packet.len() - CRC_BYTES];
    let length = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    if usize::try_from(length).ok() != Some(data.len()) {
        return Err(PacketError::Malformed("the data length is not the packet's"));
    }
    let tail = &packet[packet.len() - CRC_BYTES..];
    let found = u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let computed = crc16_ibm(data);
    if found != u32::from(computed) {
        return Err(PacketError::BadCrc { found, computed });
    }
    decode_data(data, imei)
}

/// Reads a packet's data (codec … second record count), whose CRC has been checked.
pub fn decode_data(data: &[u8], imei: &str) -> Result<AvlPacket, PacketError> {
    let mut reader = Reader { data, at: 0 };
    let codec = reader.u8()?;
    let layout = Layout::of(codec).ok_or(PacketError::UnsupportedCodec(codec))?;
    let count = usize::from(reader.u8()?);
    let mut fixes = Vec::with_capacity(count);
    for _ in 0..count {
        fixes.push(read_record(&mut reader, layout, imei)?);
    }
    if usize::from(reader.u8()?) != count {
        return Err(PacketError::Malformed("the two record counts differ"));
    }
    if reader.at != data.len() {
        return Err(PacketError::Malformed("bytes follow the second record count"));
    }
    Ok(AvlPacket { codec, fixes })
}

/// How a codec writes IO ids and counts.
#[derive(Debug, Clone, Copy)]
struct Layout {
    codec: u8,
    wide_ids: bool,
    wide_counts: bool,
    generation_type: bool,
    variable_length: bool,
}

impl Layout {
    fn of(codec: u8) -> Option<Self> {
        let layout = |wide_ids, wide_counts, generation_type, variable_length| Layout {
            codec,
            wide_ids,
            wide_counts,
            generation_type,
            variable_length,
        };
        match codec {
            CODEC_8 => Some(layout(false, false, false, false)),
            CODEC_8_EXTENDED => Some(layout(true, true, false, true)),
            CODEC_16 => Some(layout(true, false, true, false)),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self.codec {
            CODEC_8 => "8",
            CODEC_8_EXTENDED => "8E",
            _ => "16",
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.data.len());
        let end = end.ok_or(PacketError::Malformed("a record runs past the data"))?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PacketError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PacketError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An unsigned big-endian number of 1 to 8 bytes.
    fn unsigned(&mut self, size: usize) -> Result<u64, PacketError> {
        Ok(self.bytes(size)?.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
    }

    fn id(&mut self, layout: Layout) -> Result<u16, PacketError> {
        if layout.wide_ids {
            self.u16()
        } else {
            self.u8().map(u16::from)
        }
    }

    fn count(&mut self, layout: Layout) -> Result<usize, PacketError> {
        if layout.wide_counts {
            self.u16().map(usize::from)
        } else {
            self.u8().map(usize::from)
        }
    }
}

/// One record as a fix of `imei`. A record without satellites carries the unit's last known position, not a new
/// fix: it has no position (and is kept as a dead letter); its coordinates stay in the raw fields.
fn read_record(reader: &mut Reader<'_>, layout: Layout, imei: &str) -> Result<TrackerFix, PacketError> {
    let start = reader.at;
    let millis = reader.unsigned(8)?;
    let priority = reader.u8()?;
    let lon = reader.u32()? as i32;
    let lat = reader.u32()? as i32;
    let altitude = reader.u16()? as i16;
    let angle = reader.u16()?;
    let satellites = reader.u8()?;
    let speed = reader.u16()?;
    let event = reader.id(layout)?;
    if layout.generation_type {
        reader.u8()?;
    }
    // The total of IO elements: the groups below say it again, and units are known to get it wrong.
    reader.count(layout)?;
    let mut attributes = Map::new();
    for size in [1usize, 2, 4, 8] {
        for _ in 0..reader.count(layout)? {
            let id = reader.id(layout)?;
            let bytes = reader.bytes(size)?;
            io_element(&mut attributes, id, bytes);
        }
    }
    if layout.variable_length {
        for _ in 0..reader.u16()? {
            let id = reader.u16()?;
            let length = usize::from(reader.u16()?);
            let bytes = reader.bytes(length)?;
            variable_io_element(&mut attributes, id, bytes);
        }
    }
    let (lat_deg, lon_deg) = (f64::from(lat) / 1e7, f64::from(lon) / 1e7);
    let raw = json!({
        "codec": layout.name(),
        "timestamp_ms": millis,
        "latitude": lat_deg,
        "longitude": lon_deg,
        "satellites": satellites,
        "record": hex(&reader.data[start..reader.at]),
    });
    let mut fix = TrackerFix::new(imei.to_owned(), raw);
    match i128::from(millis)
        .checked_mul(1_000_000)
        .and_then(|nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).ok())
    {
        Some(at) => fix.recorded_at = Some(at),
        None => fix.unreadable("timestamp", "is not a time"),
    }
    if satellites > 0 {
        fix.lat = Some(lat_deg);
        fix.lon = Some(lon_deg);
    }
    fix.speed_kmh = Some(f64::from(speed));
    fix.heading_deg = Some(f64::from(angle));
    fix.attribute("priority", priority.into());
    fix.attribute("sat", satellites.into());
    fix.attribute("event", event.into());
    fix.attribute("altitude", altitude.into());
    // The record's own fields win over an IO element that happens to share a name.
    for (name, value) in attributes {
        fix.attributes.entry(name).or_insert(value);
    }
    Ok(fix)
}

/// A fixed-size IO element: under its name when the table below knows it (converted as Traccar converts it),
/// else under its numeric id, as the unsigned number it holds.
fn io_element(attributes: &mut Map<String, Value>, id: u16, bytes: &[u8]) {
    let value = bytes.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b));
    // Sign-extended from the element's own size.
    let signed = {
        let shift = 64 - 8 * bytes.len() as u32;
        ((value << shift) as i64) >> shift
    };
    let mut set = |name: &str, v: Value| {
        attributes.insert(name.to_owned(), v);
    };
    match id {
        1..=4 => set(&format!("in{id}"), (value > 0).into()),
        16 => set("odometer", value.into()),
        21 => set("rssi", value.into()),
        66 => set("power", thousandths(value)),
        67 => set("battery", thousandths(value)),
        69 => set("gnssStatus", value.into()),
        // iButton: the key's id, sent least significant byte first.
        78 => {
            if value != 0 {
                let mut le = bytes.to_vec();
                le.reverse();
                set("driverUniqueId", hex(&le).to_ascii_uppercase().into());
            }
        }
        // Percent, under the name every other protocol's battery level is stored under.
        113 => set("batt", value.into()),
        179 => set("out1", (value > 0).into()),
        180 => set("out2", (value > 0).into()),
        181 => set("pdop", tenths(value)),
        182 => set("hdop", tenths(value)),
        199 => set("tripOdometer", value.into()),
        239 => set("ignition", (value > 0).into()),
        240 => set("motion", (value > 0).into()),
        241 => set("operator", value.into()),
        // Teltonika EYE sensors' temperatures, in hundredths of a degree, signed.
        10800..=10803 => set(&format!("eyeTemp{}", id - 10799), json!(signed as f64 / 100.0)),
        _ => set(&id.to_string(), value.into()),
    }
}

fn thousandths(value: u64) -> Value {
    json!(value as f64 / 1000.0)
}

fn tenths(value: u64) -> Value {
    json!(value as f64 / 10.0)
}

/// A variable-length IO element (Codec 8 Extended): the VIN and the trouble codes as text, the BLE sensor tags
/// read into their fields as Traccar names them, anything else as hex under its numeric id.
fn variable_io_element(attributes: &mut Map<String, Value>, id: u16, bytes: &[u8]) {
    let text = || text(bytes);
    match id {
        256 | 325 => {
            attributes.insert("vin".to_owned(), text().into());
        }
        281 => {
            attributes.insert("dtcs".to_owned(), text().replace(',', " ").into());
        }
        548 | 10828 | 10829 | 10831 | 11317 => {
            // A list the unit may cut short: the tags read before the cut are kept, and the bytes as hex too.
            if ble_tags(attributes, bytes).is_none() {
                attributes.insert(id.to_string(), hex(bytes).into());
            }
        }
        _ => {
            attributes.insert(id.to_string(), hex(bytes).into());
        }
    }
}

/// The BLE sensor tags of one element: a header byte, then per tag its length and its (id, length, value)
/// parameters (traccar/traccar `TeltonikaProtocolDecoder.java`, ids 548, 10828, 10829, 10831, 11317). `None` when
/// the bytes do not hold such a list.
fn ble_tags(attributes: &mut Map<String, Value>, bytes: &[u8]) -> Option<()> {
    let mut reader = Reader { data: bytes, at: 0 };
    reader.u8().ok()?;
    let mut index = 1;
    while reader.at < bytes.len() {
        let length = usize::from(reader.u8().ok()?);
        let mut tag = Reader {
            data: reader.bytes(length).ok()?,
            at: 0,
        };
        while tag.at < tag.data.len() {
            let parameter = tag.u8().ok()?;
            let size = usize::from(tag.u8().ok()?);
            let value = tag.bytes(size).ok()?;
            let first = *value.first()?;
            let number = value.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b));
            let (name, value) = match parameter {
                0 => ("Rssi", json!(first as i8)),
                1 => ("Id", hex(value).into()),
                2 => {
                    // Flags, then (bit 7) the voltage in tens of millivolts above 2 V.
                    if first & 0x40 != 0 {
                        attributes.insert(format!("tag{index}LowBattery"), true.into());
                    }
                    match value.get(1) {
                        Some(v) if first & 0x80 != 0 => ("Voltage", json!(u32::from(*v) * 10 + 2000)),
                        _ => continue,
                    }
                }
                5 => ("Name", text(value).into()),
                6 => ("Temp", json!(number as u16 as i16)),
                7 => ("Humidity", number.into()),
                8 => ("Magnet", (number > 0).into()),
                9 => ("Motion", (number > 0).into()),
                10 => ("MotionCount", number.into()),
                11 => ("Pitch", json!(first as i8)),
                12 => ("AngleRoll", json!(number as u16 as i16)),
                13 => ("LowBattery", number.into()),
                14 => ("Battery", number.into()),
                15 => ("Mac", hex(value).into()),
                _ => continue,
            };
            attributes.insert(format!("tag{index}{name}"), value);
        }
        index += 1;
    }
    Some(())
}

/// Text a unit sends in a fixed-size field: padded with NUL bytes, which PostgreSQL's JSON cannot hold.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "")
}

/// Lowercase hex, two digits a byte.
pub use crate::support::hex::encode as hex;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tracker::{check, Checked, Protocol, Rejection};
    use crate::model::ValidationRules;
    use time::macros::datetime;

    pub(crate) fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    const IMEI: &str = "356307042441013";

    fn decode(hex: &str) -> Result<AvlPacket, PacketError> {
        decode_packet(&bytes(hex), IMEI)
    }

    fn vector(index: usize) -> AvlPacket {
        decode(TRACCAR_VECTORS[index].1).unwrap_or_else(|e| panic!("vector {index}: {e}"))
    }

    /// Traccar's test vectors (traccar/traccar `TeltonikaProtocolDecoderTest.java`) whose CRC holds, in its order,
    /// with their record counts. The last two need Traccar's `extended` option (16-byte IO elements in Codec 8,
    /// which no Teltonika codec defines).
    pub(crate) const TRACCAR_VECTORS: [(usize, &str); 30] = [
        (
            2,
            "000000000000010e8e020000019769de9f9800015299f718b278040018007708000000000013000b00ef0100f0000015\
             0500c80000450100010100b30000020000030000b401017c00000500b5001a00b6000c004238d4004300000044000000\
             0200f10000539b00100000efc70001004e000000000000000000000000019769de5d3b00015299f718b2780400180077\
             0800002c350001000000000000000000012c3500700124050f4e65766572615f33000000000000000f067cd9f4110c40\
             06020c8f0701340e020c1c24050f4e65766572615f31000000000000000f067cd9f411334606020c380701340e020c26\
             24050f4e65766572615f32000000000000000f067cd9f411464706020c240701360e020c26020000a8b0",
        ),
        (
            1,
            "00000000000000768e010000018fdc4b27cb015b3e33ceefa529030009013f0e00000224000100000000000000000001\
             02240049010f0001c60106babbf36300550202806d0f0001ca01063456555565690202806b0f0001d101064679754254\
             50020280690b0001c90106fa54ba8d00550b0001cf0106cabbf36300550100005455",
        ),
        (
            1,
            "00000000000000728e010000018b23dd796300fbf7263c24f9e11a000000000000000224000100000000000000000001\
             0224004501210001e50110cde39f7e42bb55aa788e4a29ed650055020ab70a8f264c6000ffff6b210001b00110f89b90\
             7e42bb55aaa3463b29ed650055020ab708bb2600ae0500096c01000051d4",
        ),
        (
            1,
            "000000000000004b8e010000018368952793000f0e54fc209ab05800b300b40e00002a4f000100000000000000000001\
             2a4f001e011c0001a40110eb47706aa38255aa96f21a154e2d00550d01000e020bd6010000823f",
        ),
        (
            1,
            "00000000000000a28e0100000183ac617e3001123eb99b1e142db4000000000000000000001d000900f0000050000015\
             03004500011e1801212d01242a012722012a18001100b5000000b600000018000000cd151000431c2d011f6981012047\
             d701226981012347d901256981012647d8012869810129e6f304b0000304b1000304b2000304b30003000100f1000063\
             9d0002000b0000000214bf12fe000e0000000029d18c95000001000051b6",
        ),
        (
            4,
            "00000000000004258e0400000182a701b49301d5d90ab7ebe4aae101be003d12000000f7003d000e00f70100ef0000f0\
             0000500500150200c800004501000100001d00001400001600001700007157010701001d00b5000b00b6000600423040\
             0018000000cd223f00ce741700430f8900440000000d00010011ffe50012001f0013ffce000f03e800190bb8001a0bb8\
             001b0bb8001c0bb800560bb800680bb8006a0bb8006c0bb8010e0000011100000114000001170000014f000001500000\
             0151000001520000000a00f100011d2a00c700000000001000b9addc000c0000acb60004000000000132000000000133\
             0000000001340000000001350000000001c1000000000003000b000000d14675f36000ee0000000000000000000e0000\
             000003fd509f0005014b0000014c0000014d0000014e0000018300222d3333373333382e0100000053a6fb6245880400\
             01ba86064f0eae51c0fdaf4d3de500000182a701b82001d5d90ab7ebe4aae101be003d12000000f0003c000d00ef0000\
             f00100500500150200c800004501000100001d00001400001600001700007152010701001d00b5000900b60006004217\
             e50018000000cd223f00ce741700430f5c00440000000d00010011fed60012fd1d0013f1f2000f03e800190bb8001a0b\
             b8001b0bb8001c0bb800560bb800680bb8006a0bb8006c0bb8010e0000011100000114000001170000014f0000015000\
             000151000001520000000a00f100011d2a00c700000000001000b9addc000c0000acb600040000000001320000000001\
             330000000001340000000001350000000001c1000000000003000b000000d14675f36000ee0000000000000000000e00\
             00000003fd509f0005014b0000014c0000014d0000014e0000018300222d3333373333352e353833332d303730373139\
             362e323333332b3030302e3434362f00000182a701bc0801d5d90ab7ebe4aae101be003d12000000fc003d000e00ef00\
             00f00100500500150200c800004501000100001d0000140000160000170000714d01070100fc01001d00b5000900b600\
             06004217e50018000000cd223f00ce741700430f5c00440000000d00010011fed60012fd1d0013f1f2000f03e800190b\
             b8001a0bb8001b0bb8001c0bb800560bb800680bb8006a0bb8006c0bb8010e0000011100000114000001170000014f00\
             00015000000151000001520000000a00f100011d2a00c700000000001000b9addc000c0000acb6000400000000013200\
             00000001330000000001340000000001350000000001c1000000000003000b000000d14675f36000ee00000000000000\
             00000e0000000003fd509f0005014b0000014c0000014d0000014e0000018300222d3333373333352e353833332d3037\
             30373139362e323333332b3030302e3434362f00000182a7018d8d01d5d8ffa6ebe4a0ca01be006111000000f7000100\
             0100f70500000000000000000400003a10",
        ),
        (
            4,
            "00000000000003831004000001735ace37f80000e3b9331c71e290006900e211005100fd072e16000101001603004703\
             00f00100150400b20000c80000ef01009000004f00005101005201005300005538006e00006f00007a03007d00007f56\
             00890000fd0200fe1f09004326b00044000000b5000b00b6000600427029001800540046015d00ce4ec10080000f0f00\
             f10000515400cd007404ab00d80f5022a100500000005400540000000000560001556800570000006000580000042000\
             6800001113006d303330300071fffd8c85008700000020008800000002008a000155f5008b0000b86000000001735ace\
             3ca80000e3b08a1c71dd29006900e311005100fd072e1600010100160300470300f00100150400b20000c80000ef0100\
             9000004f00005101005201005300005537006e00006f00007a03007d00007f5600890000fd0200fe1d09004326ac0044\
             000000b5000b00b600060042701f001800540046015d00ce4ec10080000f0f00f10000515400cd007404ab00d80f5022\
             ce00500000005400540000000000560001556800570000006000580000041f006800001113006d303330300071fffd8c\
             85008700000020008800000002008a000155f5008b0000b86000000001735ace3fc80000e3a7c01c71d7c2006900e311\
             005100fd072e1600010100160300470300f00100150400b20000c80000ef01009000004f000051010052010053000055\
             37006e00006f00007a03007d00007f5600890000fd0200fe2309004326ac0044000000b5000b00b60006004270150018\
             00540046015e00ce4ec10080000f0f00f10000515400cd007404ab00d80f5022e7005000000054005400000000005600\
             01556800570000006000580000041f006800001113006d303330300071fffd8c85008700000020008800000002008a00\
             0155f5008b0000b86000000001735ace3ffa0000e3a7c01c71d7c2006900e311005100fd072e16000101001603004703\
             00f00100150400b20000c80000ef01009000004f00005101005201005300005537006e00006f00007a03007d00007f56\
             00890000fd0300fe2309004326ac0044000000b5000b00b6000600427015001800540046015e00ce4ec10080000f0f00\
             f10000515400cd007404ab00d80f5022e700500000005400540000000000560001556800570000006000580000041f00\
             6800001113006d303330300071fffd8c85008700000020008800000002008a000155f5008b0000b86000040000eb85",
        ),
        (
            3,
            "00000000000000e708030000018293d62060000de1f6a62159767e00000000000000000b074504f00050041500c801ef\
             004f630342320043000344000001f100006019000000018291b0c790000de1f6a62159767e006e0144070000ef120745\
             03f00050051505c800ef004f0207b5000eb6000b423324180000ce00dc43001144000004c700000007f100006019cd00\
             03c7776300ea4e2e000000018291aff0b8000de1f91f21597405006f00f61300080012074503f00150051504c800ef01\
             4f0207b50009b600054236c1180008ce00dc43003f44000004c700000003f100006019cd0003c7776300ea4e27000300\
             00a48d",
        ),
        (
            3,
            "00000000000000da08030000017fcedf499600280431be0eded45d0038012d100000fa100901000200b300b400450150\
             0415034702fa00054232a1180000cd3b2fce281d43001f02c700000006f10000a029000000017fcedea9960028043207\
             0eded3dd00380046130009000f0801010200b300b400450150051502470205423276180009cd3b2fce281d43001f02c7\
             00000027f10000a0290000000179d50853180027f65d3f0ed67212001500f1110061000f0801010200b300b400450150\
             0515034702054234f4180061cd53d1ce28c043003e02c700000147f1000000290003000052cb",
        ),
        (
            2,
            "00000000000000b98e0200000179555c7bf8010b3a1cfbebc142b00000000000000000ec000f000900f00000150000c8\
             0000450200710100740001070100fa0000ec01000500b500000018000000430d560044000000190000000100f1000000\
             000000000000000179555c83c8010b3a1cfbebc142b0000000000000000185000f000900f00000150000c80000450200\
             710100740001070100fa00018511000500b500000018000000430d560044000000190000000100f10000000000000000\
             0200003251",
        ),
        (
            1,
            "00000000000000a38e0100000178b11c9e1000040bbbc91f03190c002100e113001300000010000600ef0100f0010015\
             0300c800004501001e070005004237e00018000a00ce166200430f970024059f000300f10000665900c70000001e0010\
             0000a1b500000002010000115756315a5a5a32455a38363031353338380119002950303239392c50303637352c503036\
             37342c50303637322c50303637312c50303437312c50324241430100001ad8",
        ),
        (
            2,
            "00000000000000858e0200000174431aadc100061d888f21000e8a0032002e0c00000181000100000000000000000001\
             0181001711210102030405060708090a0b0c0d0e0f10020b010ad000000174431a389100061d888f21000e8a0033002e\
             0d000001810001000000000000000000010181001711210102030405060708090a0b0c0d0e0f10020b010ad202000049\
             2b",
        ),
        (
            1,
            "000000000000004c08010000016818d500580009c28d9f1cb3757a00be00c60f0053000f06f0011503c80001011d00fc\
             0007423799180053cdf80dce426f430f88190bb8560bb802f100005aa110002887e000010000ee8d",
        ),
        (
            1,
            "00000000000000818e0100000166e368a510000f0d8b5b20961c35008d010308000000000014000900ef0000f0010050\
             0100150400c800004501001e00002500002900000a00b5000800b60007004230dc0018000000430fcb0044005f001103\
             de001200e50013001200240000000000000001010000113141314a433534343452373235323336370100005e99",
        ),
        (
            1,
            "000000000000009f100100000164d855401800d5e3b744ec11c762023b011a060000000007200a010000010500010600\
             010d00010e00010f00011600011700011800011f001301010000010700000108000001090000010a0000010b0000010c\
             000001100000011100000112000001130000011400000115000001190000011a0000011b0000011c0000011d0000011e\
             000003010200000000010300000000010400000000000100000d3b",
        ),
        (
            1,
            "00000000000000a708010000016269e7d9a8000a5a0f0a1cbf8f3300880046120000001c0801014f005100550f740073\
             007801790103430000440000426f980b540000000056000045275700000047580000022659000000005d000000006800\
             0003d07100007355870000000288000000008a000045270669584c5241534834336a30304731363538326b3600ffffff\
             0000008155412055414430308230303039383236368330303000000000000100008396",
        ),
        (
            1,
            "0000000000000035080100000161f37c50500020de5ba60ef11450000000000000000006040100b300b400ef00010900\
             2000014e0000000000000000010000be52",
        ),
        (
            1,
            "000000000000008c08010000013feb55ff74000f0ea850209a690000940000120000001e090100020003000400160147\
             03f0001504c8000c0900730a00460b00501300464306d7440000b5000bb60007422e9f180000cd0386ce000107c70000\
             0000f10000601a46000001344800000bb84900000bb84a00000bb84c00000000024e0000000000000000cf0000000000\
             0000000100003fca",
        ),
        (
            14,
            "0000000000000401080e0000015d12cc211000fadaf627186742f5000d0048080006000a040100f00150051500034231\
             8a430fe344000003c700000000f1000068b61000001b05000000015d12c6683800fadaf72118673f8200000000000000\
             0007030100f00050040342318a430fe344000001f1000068b6000000015d12bd407800fadaf72118673f820000000000\
             00000007030100f000500403423179430fe144000001f1000068b6000000015d12b414d000fadaf72118673f82000400\
             900c0000fa120a0100f00050051502080007010552090e6f4bfa000542316a430fe14400000600006202b203c7000023\
             28f1000068b61000001b05000000015d12b3074800fadaf2821867436a000400890d00170011090100f0015001150208\
             1007010553090e6f4d054231fb430fe14400000603ae6202a003c700002328f1000068b61000001b05000000015d12b2\
             ff7800fadaee89186747c60005009a0d001d0011090100f00150011502081b07010553090e6f4d05423125430fe14400\
             0006050862029e03c700002328f1000068b61000001b05000000015d12b2e42000fadae8cf18675e0a000300a60d0021\
             0011090101f00150011502082407030554090e6f4d0542310a430fe14400000606cf62029703c700002328f1000068b6\
             1000001b05000000015d12b2d48000fadae05818676a16000400930c00240011090100f0015001150208220701055409\
             0e6f4e05423738430fe144000006066a62029303c700002328f1000068b61000001b05000000015d12b2a1b800fadac3\
             3e18678e48000600940d00150011090101f00150051500081907030553090e6f4e054239cc430fe14400000607c66202\
             8603c700002328f1000000001000001b05000000015d12b29dd000fadac19d18678fc8000700820d00110011090100f0\
             0150051500081607030553090e6f4e054238c8430fe14400000606d962028503c700002328f1000000001000001b0500\
             0000015d12b299e800fadabfa9186790e3000700670d00110011090101f00150051500081407030553090e6f4e054231\
             e5430fe144000006060a62028403c700002328f1000000001000001b05000000015d12b2960000fadabd401867910400\
             0600510d00120011090101f00150051500081207030553090e6f4e054231ce430fe144000006057062028303c7000023\
             28f1000000001000001b05000000015d12b27aa800fadaa96518678b7c000600470d00120011090101f0015005150008\
             1807030551090e6f4e05423a70430fe144000006074462027c03c700002328f1000000001000001b05000000015d12b2\
             76c000fadaa73f18678ae60006003b0d000e0011090101f00150051500081607030551090e6f4e05423a5a430fe14400\
             000606b762027b03c700002328f1000000001000001b05000e000007a4",
        ),
        (
            8,
            "00000000000002cb08080000015a71ccbec00002fc9bfc1e53a1e00016004cf80005001914150216056500ee00ef00f0\
             009d029e029f02a002a102a202a302a402a502a602020003000164d20003480100c6000ac500ce02c80000654ec70000\
             4ee8000000015a725aaac80002fc933c1e539d4000150049f80000001914150116056500ee00ef00f0009d029e029f02\
             a002a102a202a302a402a502a602020003000164d200034800f4c6000ac500ce02c80000654ec700004ee8000000015a\
             75a42c900002fc97d01e539640001d0008020000001914150016056500ee00ef00f0009d029e029f02a002a102a202a3\
             02a402a502a602020003000164d200034800f8c6000ac500ce02c80006ba5ac700004ee8000000015a75a440180002fc\
             931c1e539b60001d00b9020001001914150016056500ee00ef00f0009d029e029f02a002a102a202a302a402a502a602\
             020003000164d200034800fac6000ac500ce02c80006ba5ac700004ee8000000015a75a453a00002fc93601e539cc000\
             1d015d0c0000001914150016056500ee00ef00f0009d029e029f02a002a102a202a302a402a502a602020003000164d2\
             00034800f9c6000ac500ce02c80006ba5ac700004ee8000000015a75a467280002fc93801e539cc0001d013c0c000000\
             1914150016056500ee00ef00f0009d029e029f02a002a102a202a302a402a502a602020003000164d200034800f9c600\
             0ac500ce02c80006ba5ac700004ee8000000015a75a47ab00002fc92cc1e539c80001d00b00c00000019141500160565\
             00ee00ef00f0009d029e029f02a002a102a202a302a402a502a602020003000164d200034800f8c60004c5000a02c800\
             003085c70006ba5a000000015a75a48e380002fc92ec1e539c40001d00410c0000001914150116056500ee00ef00f000\
             9d029e029f02a002a102a202a302a402a502a602020003000164d200034800f8c6000ac500ce02c80000c83dc700004e\
             e800080000e0b2",
        ),
        (
            4,
            "000000000000009f080400000159738f76b8012e13b796110ab27600d700000b00004e01000000014e00000000000000\
             0000000159738f6ee8012e13b796110ab27600d700000a00004e01000000014e01000b00791c179300000159738f6b00\
             012e13b796110ab27600d700000a00004e01000000014e000000000000000000000159738f5f48012e13b796110ab276\
             00d700000b00004e01000000014e01000b00791c17930400009671",
        ),
        (
            1,
            "000000000000003508010000014f8e016420002141bbaf0f4e96a7fffa0000120000000602010047030242669c920000\
             02c7000000009100000000000100002df3",
        ),
        (
            6,
            "000000000000014708060000013e5a60a4cb003fa7b780fc424518004200000a000000090501010200b300b400f00003\
             4268a746011818000001c700000000000000013e5dc8ba28003fa7c080fc4246040001000005000000090501010200b3\
             00b400f001034268b44600ef18000001c700000000000000013e5dc90455003fa7b640fc424388003a0000070000f009\
             0501010200b300b400f000034268dc4600f718000001c70000001d000000013e5dc9d368003fa7b800fc424430004900\
             0004000000090501010200b300b400f001034267de46010718000001c700000000000000013e5dca311d003fa7b680fc\
             4243cc00420000070000f0090501010200b300b400f0000342685346010b18000001c700000000000000013e5dcfafe9\
             003fa7b600fc4242f0003d000008000000090501010200b300b400f0000342685246011918000001c700000000000600\
             000275",
        ),
        (
            1,
            "000000000000002c08010000013eff8d6f9800173295002111f400008100ae0b0000000401010003090016432980422f\
             7200000100007a5d",
        ),
        (
            1,
            "000000000000002b080100000140d4e3ec6e000cc661d01674a5e0fffc00000900000004020100f00002423223180000\
             00000100007a04",
        ),
        (
            1,
            "000000000000004508010000015eb70a86d00024089d4d21dee3860137005f12005f000e06ef01f00150011503c80045\
             0108b5000bb6000642382718005fcd057ace19d3430f57440000000001000002bf",
        ),
        (
            1,
            "000000000000004a08010000015ebc1da508002411926621f15246010b00b913005e000f06ef01f00150011505c80045\
             0108b5000bb6000642381b18005ecd0318ce19cd430f5844000001f1000061a900010000c8e1",
        ),
        (
            1,
            "00000000000000628e0100000193011f1ec8003fa9def2fc401ea4000d00000400000000000f000700ef0000f0000015\
             0500c8000045012a34492a3800000600b5001300b60011004230aa00430fb7004400002a30fb5d000200f10000c74200\
             100000014900000000010000fbff",
        ),
        (
            11,
            "0000000000000158080b0000015d4b4dc07a00d5dbd13eec04324e020e0000120000000000000000000000015d4b4cd5\
             e800d5dbd13eec04324e020e0000120000000000000000000000015d4b4beb8800d5dbd13eec04324e020e0000130000\
             000000000000000000015d4b4b012800d5dbd13eec04324e020e0000120000000000000000000000015d4b4a16c800d5\
             dbd13eec04324e020f0000110000000000000000000000015d4b492c6800d5dbd13eec04324e020f0000110000000000\
             000000000000015d4b48420800d5dbd13eec04324e020f0000120000000000000000000000015d4b4757a800d5dbd13e\
             ec04324e020f00000f0000000000000000000000015d4b466d4800d5dbd13eec04324e020f0000100000000000000000\
             000000015d4b4582e800d5dbd13eec04324e020f0000110000000000000000000000015d4b44988800d5dbd13eec0432\
             4e020f0000110000000000000000000b0000ec10",
        ),
        (
            11,
            "00000000000003b5080b0000015ab5642a8800d5db1769ec01d70a020a00e3040004000e050101020003000400600006\
             0900100a00010b0000130000422f1318000302c700000000f7000000000001cb00000000000000000000000000000000\
             0000015ab5642e7000d5db178aec01d6d6020a0070040003000e0501010200030004006000060900100a00000b000013\
             0000422f1318000302c700000000f7000000000001cb000000000000000000000000000000000000015ab567050000d5\
             db1805ec01da3c02060101040006000e05010102000300040060000609000f0a00010b0000130000422f0c18000302c7\
             00000046f7000000000001cb000000000000000000000000000000000000015ab56708e800d5db1723ec01d9ec020600\
             e5040006000e05010102000300040060000609000f0a00010b0000130000422f1018000502c700000003f70000000000\
             01cb000000000000000000000000000000000000015ab5685cc000d5db20f7ec01d8fa02080033050007000e05010102\
             000300040060000609000f0a00010b0000130000422f0a18000502c700000030f7000000000001cb0000000000000000\
             00000000000000000000015ab5693b6800d5db2367ec01d9430211011b040006000e0501010200030004006000060900\
             0f0a00010b0000130000422f0c18000302c700000027f7000000000001cb000000000000000000000000000000000000\
             015ab569433800d5db1fb2ec01d9310211008b040006000e0501010200030004006000060900110a00000b0000130000\
             422f1318000402c700000009f7000000000001cb000000000000000000000000000000000000015ab56a0e5800d5db22\
             a2ec01da5502100041050007000e05010102000300040060000609000f0a00000b0000130000422f1118000602c70000\
             000ef7000000000001cb000000000000000000000000000000000000015ab56a700000d5db2afcec01ddb2020a001205\
             0008000e05010102000300040060000609000e0a00000b0000130000422f0918000502c700000026f7000000000001cb\
             000000000000000000000000000000000000015ab56a73e800d5db2ad8ec01de65020a014e050008000e050101020003\
             00040060000609000f0a00010b0000130000422f0818000702c700000002f7000000000001cb00000000000000000000\
             0000000000000000015ab56a7bb800d5db2971ec01e00e020a013f040008000e0501010200030004006000060900100a\
             00020b0000130000422f0b18000802c700000004f7000000000001cb000000000000000000000000000000000b00007c\
             5f",
        ),
    ];

    #[test]
    fn the_crc_is_crc16_ibm() {
        // The check value of CRC-16/ARC over "123456789".
        assert_eq!(crc16_ibm(b"123456789"), 0xBB3D);
        assert_eq!(crc16_ibm(b""), 0);
    }

    #[test]
    fn a_handshake_names_its_imei() {
        assert_eq!(
            read_imei(&bytes("000F313233343536373839303132333435")),
            Some("123456789012345")
        );
        assert_eq!(read_imei(&bytes("0002ff00")), None);
        assert_eq!(read_imei(&bytes("0000")), None);
    }

    #[test]
    fn a_packet_is_answered_with_its_record_count_in_four_bytes() {
        assert_eq!(records_answer(14), [0, 0, 0, 14]);
        assert_eq!(records_answer(300), [0, 0, 1, 44]);
    }

    #[test]
    fn a_codec_8_record_reads_as_teltonikas_documentation_lays_it_out() {
        // An FMB in Vienna: 1 record, 15 satellites, 83 km/h.
        let packet = vector(12);
        assert_eq!(packet.codec, CODEC_8);
        assert_eq!(packet.fixes.len(), 1);
        let fix = &packet.fixes[0];
        assert_eq!(fix.device_id, IMEI);
        assert_eq!(fix.recorded_at, Some(datetime!(2019-01-04 12:27:19 UTC)));
        assert_eq!((fix.lat, fix.lon), (Some(48.1523066), Some(16.3745183)));
        assert_eq!((fix.speed_kmh, fix.heading_deg), (Some(83.0), Some(198.0)));
        let a = &fix.attributes;
        let expected = json!({
            "priority": 0, "sat": 15, "event": 0, "altitude": 190,
            "motion": true, "rssi": 3, "200": 0, "in1": true, "29": 0, "252": 0,
            "power": 14.233, "24": 83, "205": 63501, "206": 17007, "battery": 3.976, "25": 3000, "86": 3000,
            "operator": 23201, "odometer": 2656224,
        });
        assert_eq!(&Value::Object(a.clone()), &expected);
        let raw: Value = serde_json::from_str(&fix.raw.to_json()).unwrap();
        assert_eq!(raw["timestamp_ms"], json!(1546604839000u64));
        assert_eq!(raw["codec"], json!("8"));
        assert_eq!(raw["record"].as_str().map(str::len), Some(2 * 73));
    }

    #[test]
    fn a_codec_16_record_reads_its_two_byte_ids_and_generation_type() {
        let packet = vector(6);
        assert_eq!((packet.codec, packet.fixes.len()), (CODEC_16, 4));
        let fix = &packet.fixes[0];
        assert_eq!(fix.recorded_at, Some(datetime!(2020-07-17 03:25:31 UTC)));
        assert_eq!((fix.lat, fix.lon), (Some(47.7225616), Some(1.4924083)));
        assert_eq!((fix.speed_kmh, fix.heading_deg), (Some(81.0), Some(226.0)));
        assert_eq!(fix.attributes["sat"], json!(17));
        assert_eq!(fix.attributes["altitude"], json!(105));
    }

    #[test]
    fn codec_8_extended_reads_the_vin_and_the_trouble_codes_as_text() {
        let fix = &vector(13).fixes[0];
        assert_eq!(fix.attributes["vin"], json!("1A1JC5444R7252367"));
        let fix = &vector(10).fixes[0];
        assert_eq!(fix.attributes["vin"], json!("WV1ZZZ2EZ86015388"));
        assert_eq!(
            fix.attributes["dtcs"],
            json!("P0299 P0675 P0674 P0672 P0671 P0471 P2BAC")
        );
    }

    #[test]
    fn every_traccar_vector_decodes_to_its_record_count_with_times_and_positions_in_range() {
        for (index, (count, hex)) in TRACCAR_VECTORS.iter().enumerate().take(TRACCAR_VECTORS.len() - 2) {
            let packet = decode(hex).unwrap_or_else(|e| panic!("vector {index}: {e}"));
            assert_eq!(packet.fixes.len(), *count, "vector {index}");
            for fix in &packet.fixes {
                let at = fix.recorded_at.unwrap_or_else(|| panic!("vector {index}: no time"));
                assert!((2007..=2026).contains(&at.year()), "vector {index}: {at}");
                match (fix.lat, fix.lon) {
                    (Some(lat), Some(lon)) => {
                        assert!(
                            (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon),
                            "vector {index}"
                        );
                        assert_ne!(fix.attributes["sat"], json!(0), "vector {index}");
                    }
                    (None, None) => assert_eq!(fix.attributes["sat"], json!(0), "vector {index}"),
                    other => panic!("vector {index}: {other:?}"),
                }
                assert!(fix.unreadable.is_none(), "vector {index}");
                // Every record with a fix is stored when it arrives: nothing it carries breaks a rule.
                let rules = ValidationRules::with_defaults(at + time::Duration::minutes(1));
                let sent_a_fix = fix.lat.is_some();
                match check(fix.clone(), Protocol::Teltonika, &rules) {
                    Checked::Stored { .. } => assert!(sent_a_fix, "vector {index}"),
                    Checked::Rejected { letter, .. } => {
                        assert!(!sent_a_fix, "vector {index}: {}", letter.message);
                        assert_eq!(letter.reason, "no_position", "vector {index}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_attribute_values_traccars_tests_check_are_read_the_same() {
        // `verifyAttribute(…, "tag1Voltage", 3090)`, `(…, "tag1Battery", 3030)`, `(…, "eyeTemp1", -11.87)`.
        assert_eq!(vector(1).fixes[0].attributes["tag1Voltage"], json!(3090));
        assert_eq!(vector(3).fixes[0].attributes["tag1Battery"], json!(3030));
        assert_eq!(vector(27).fixes[0].attributes["eyeTemp1"], json!(-11.87));
        // A tag's name is padded with NUL bytes to its field's size.
        let tags = &vector(0).fixes[1].attributes;
        assert_eq!(
            (
                &tags["tag1Name"],
                &tags["tag1Temp"],
                &tags["tag1Humidity"],
                &tags["tag1Battery"]
            ),
            (&json!("Nevera_3"), &json!(3215), &json!(52), &json!(3100))
        );
        assert_eq!(tags["tag3Name"], json!("Nevera_2"));
    }

    #[test]
    fn codec_8_with_traccars_extended_option_is_not_codec_8_and_is_refused() {
        for index in [TRACCAR_VECTORS.len() - 2, TRACCAR_VECTORS.len() - 1] {
            assert!(
                matches!(decode(TRACCAR_VECTORS[index].1), Err(PacketError::Malformed(_))),
                "vector {index}"
            );
        }
    }

    #[test]
    fn damaged_packets_from_traccars_tests_are_refused_with_their_reason() {
        // Traccar reads these anyway (it checks no CRC): one byte changed, the length field 0, a packet cut short.
        let changed_byte =
            "000000000000008c08010000013feb55ff74000f0ea850209a690000940000120000001e09FD01FE210300040016\
            014703f0001504c8000c0900730a00460b00501300464306d7440000b5000bb60007422e9f180000cd0386ce000107c700000000\
            f10000601a46000001344800000bb84900000bb84a00000bb84c00000000024e0000000000000000cf0000000000000000010000\
            3fca";
        assert!(matches!(
            decode(changed_byte),
            Err(PacketError::BadCrc { found: 0x3fca, .. })
        ));
        let no_length =
            "0000000000000000080100000113fc208dff00209cca800f14f650006f00d60400040004030101150316030001460000\
            015d000100000000";
        assert_eq!(
            decode(no_length),
            Err(PacketError::Malformed("the data length is not the packet's"))
        );
        let cut = "00000000000000a608010000013f14a1d1ce000f0eb790209a778000ab010c0500000000000000000100003390";
        assert_eq!(
            decode(cut),
            Err(PacketError::Malformed("the data length is not the packet's"))
        );
        // Codec 13 (a command's answer) is not AVL data.
        let codec_13 = "00000000000000170D01050000000F0000016C0A81C320676574696E666F0100006855";
        assert_eq!(decode(codec_13), Err(PacketError::UnsupportedCodec(0x0D)));
    }

    #[test]
    fn a_record_without_satellites_has_no_position_and_becomes_a_dead_letter() {
        let fix = vector(2).fixes.remove(0);
        assert_eq!((fix.lat, fix.lon), (None, None));
        let raw: Value = serde_json::from_str(&fix.raw.to_json()).unwrap();
        assert_eq!(raw["latitude"], json!(62.0355866));
        let rules = ValidationRules::with_defaults(datetime!(2023-10-12 13:00 UTC));
        match check(fix, Protocol::Teltonika, &rules) {
            Checked::Rejected { letter, rejection } => {
                assert_eq!(rejection, Rejection::NoPosition);
                assert_eq!(letter.protocol, "teltonika");
                assert_eq!(letter.device_id.as_deref(), Some(IMEI));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_record_at_null_island_becomes_a_dead_letter() {
        let mut packet = bytes(TRACCAR_VECTORS[14].1);
        // Longitude and latitude (after 8 header, codec, count, 8 time and 1 priority bytes) set to 0.
        packet[19..27].fill(0);
        let data_end = packet.len() - CRC_BYTES;
        let crc = crc16_ibm(&packet[HEADER_BYTES..data_end]);
        packet[data_end..].copy_from_slice(&u32::from(crc).to_be_bytes());
        let fix = decode_packet(&packet, IMEI).unwrap().fixes.remove(0);
        let rules = ValidationRules::with_defaults(fix.recorded_at.unwrap());
        match check(fix, Protocol::Teltonika, &rules) {
            Checked::Rejected { rejection, .. } => assert_eq!(rejection, Rejection::NullIsland),
            other => panic!("{other:?}"),
        }
    }
}
