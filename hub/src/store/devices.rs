//! Device rows: registration, presence, reports, and the write-through cache every device read goes through.

use super::{Result, Store, StoreError, to_i64, to_u64};
use flotilla_shared::DeviceId;
use flotilla_shared::codec::decode_exact;
use flotilla_shared::wire::{Inventory, PublicKey, Report};
use rusqlite::params;
use std::cell::{Ref, RefMut};
use std::collections::BTreeMap;

/// A registered device as the hub sees it.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub id: DeviceId,
    pub public_key: PublicKey,
    pub inventory: Inventory,
    pub online: bool,
    pub last_seen: u64,
    pub offline_since: Option<u64>,
    pub report_counter: u64,
    pub last_report: Option<Report>,
}

/// What an unloaded cache reads as (not reached: loading either succeeds or returns its error first).
static EMPTY_DEVICES: BTreeMap<DeviceId, DeviceRow> = BTreeMap::new();

/// (id, public_key, inventory, online, last_seen, offline_since, report_counter, last_report) as stored.
type RawDeviceRow = (
    String,
    Vec<u8>,
    Vec<u8>,
    i64,
    i64,
    Option<i64>,
    i64,
    Option<Vec<u8>>,
);

impl Store {
    /// The device cache for reading, loaded from the table if it is not loaded. Shared borrows: reads may nest.
    fn device_rows(&self) -> Result<Ref<'_, BTreeMap<DeviceId, DeviceRow>>> {
        drop(self.device_cache()?);
        Ok(Ref::map(self.devices.borrow(), |c| match c {
            Some(map) => map,
            None => &EMPTY_DEVICES,
        }))
    }

    /// The device cache for writing, loaded from the table if it is not loaded.
    fn device_cache(&self) -> Result<RefMut<'_, BTreeMap<DeviceId, DeviceRow>>> {
        let mut cache = self.devices.borrow_mut();
        if cache.is_none() {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, public_key, inventory, online, last_seen, offline_since, report_counter, last_report
                 FROM devices",
            )?;
            let rows = stmt.query_map([], Self::device_from_row)?;
            let mut map = BTreeMap::new();
            for r in rows {
                let row = Self::device_row(r?)?;
                map.insert(row.id.clone(), row);
            }
            *cache = Some(map);
        }
        Ok(RefMut::map(cache, |c| c.get_or_insert_with(BTreeMap::new)))
    }

    fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawDeviceRow> {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
        ))
    }

    fn device_row(raw: RawDeviceRow) -> Result<DeviceRow> {
        let (id, key, inv, online, last_seen, offline_since, counter, report) = raw;
        let key: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt("public key".into()))?;
        Ok(DeviceRow {
            id: DeviceId::new(id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            public_key: PublicKey(key),
            inventory: decode_exact(&inv).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            online: online != 0,
            last_seen: to_u64(last_seen),
            offline_since: offline_since.map(to_u64),
            report_counter: to_u64(counter),
            last_report: report.and_then(|b| decode_exact(&b).ok()),
        })
    }

    /// Removes a device row (a revoked device enrolling again with a new key).
    pub fn delete_device(&self, id: &DeviceId) -> Result<()> {
        self.conn
            .execute("DELETE FROM devices WHERE id = ?1", [id.as_str()])?;
        self.device_cache()?.remove(id);
        Ok(())
    }

    pub fn insert_device(
        &self,
        id: &DeviceId,
        key: &PublicKey,
        inventory: &Inventory,
        now: u64,
    ) -> Result<()> {
        let inv = postcard::to_stdvec(inventory).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut cache = self.device_cache()?;
        self.conn.execute(
            "INSERT INTO devices (id, public_key, inventory, enrolled_at) VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), key.0.as_slice(), inv, to_i64(now)],
        )?;
        // The column defaults of the table.
        cache.insert(
            id.clone(),
            DeviceRow {
                id: id.clone(),
                public_key: *key,
                inventory: inventory.clone(),
                online: false,
                last_seen: 0,
                offline_since: None,
                report_counter: 0,
                last_report: None,
            },
        );
        Ok(())
    }

    pub fn device_exists(&self, id: &DeviceId) -> Result<bool> {
        Ok(self.device_rows()?.contains_key(id))
    }

    /// The region a device enrolled in: `None` for an unknown device, `Some(None)` for one without a region.
    pub fn device_region(&self, id: &DeviceId) -> Result<Option<Option<String>>> {
        self.with_device(id, |r| r.inventory.region.as_ref().map(|x| x.to_string()))
    }

    /// Runs `f` on one device's row without copying it (telemetry reads the region and zone per record).
    pub fn with_device<T>(
        &self,
        id: &DeviceId,
        f: impl FnOnce(&DeviceRow) -> T,
    ) -> Result<Option<T>> {
        Ok(self.device_rows()?.get(id).map(f))
    }

    /// One device (the hot path for reports).
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRow>> {
        Ok(self.device_rows()?.get(id).cloned())
    }

    /// Every device, ordered by id.
    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        Ok(self.device_rows()?.values().cloned().collect())
    }

    /// Runs `f` over every device (ordered by id) without copying the rows. `f` may read the store but must not
    /// write devices (the rows are borrowed while it runs).
    pub fn with_devices<T>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = &DeviceRow>) -> T,
    ) -> Result<T> {
        Ok(f(&mut self.device_rows()?.values()))
    }

    pub fn set_presence(&self, id: &DeviceId, online: bool, now: u64) -> Result<()> {
        let mut cache = self.device_cache()?;
        self.fast
            .prepare_cached(
                "UPDATE devices SET online = ?2, last_seen = ?3,
                    offline_since = CASE WHEN ?2 THEN NULL ELSE COALESCE(offline_since, ?3) END WHERE id = ?1",
            )?
            .execute(params![id.as_str(), online, to_i64(now)])?;
        if let Some(d) = cache.get_mut(id) {
            d.online = online;
            d.last_seen = now;
            d.offline_since = if online {
                None
            } else {
                d.offline_since.or(Some(now))
            };
        }
        Ok(())
    }

    /// Stores an accepted report (and the inventory it carries, if any).
    pub fn save_report(&self, id: &DeviceId, report: &Report, now: u64) -> Result<()> {
        let bytes = postcard::to_stdvec(report).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut cache = self.device_cache()?;
        self.fast
            .prepare_cached(
                "UPDATE devices SET report_counter = ?2, last_report = ?3, last_seen = ?4, online = 1,
                    offline_since = NULL WHERE id = ?1",
            )?
            .execute(params![id.as_str(), to_i64(report.counter), bytes, to_i64(now)])?;
        if let Some(inv) = &report.inventory {
            let inv = postcard::to_stdvec(inv).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.fast
                .prepare_cached("UPDATE devices SET inventory = ?2 WHERE id = ?1")?
                .execute(params![id.as_str(), inv])?;
        }
        if let Some(d) = cache.get_mut(id) {
            d.report_counter = report.counter;
            d.last_seen = now;
            d.online = true;
            d.offline_since = None;
            if let Some(inv) = &report.inventory {
                d.inventory = inv.clone();
            }
            d.last_report = Some(report.clone());
        }
        Ok(())
    }
}
