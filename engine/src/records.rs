//! Control-plane records: opaque JSON (hooks, their delivery progress) that the engine keeps
//! durable in its journal like everything else, with the events of their changes.

use crate::error::Result;
use crate::pool::Pool;

impl Pool {
    /// Every record of `kind`, by id.
    pub fn records(&self, kind: &str) -> Vec<(String, serde_json::Value)> {
        let st = self.inner.state.lock();
        st.catalog
            .records
            .range((kind.to_string(), String::new())..)
            .take_while(|((k, _), _)| k == kind)
            .map(|((_, id), value)| (id.clone(), value.clone()))
            .collect()
    }

    pub fn record(&self, kind: &str, id: &str) -> Option<serde_json::Value> {
        let st = self.inner.state.lock();
        st.catalog
            .records
            .get(&(kind.to_string(), id.to_string()))
            .cloned()
    }

    /// Sets a record durably, logging `events` with it.
    pub async fn put_record(
        &self,
        kind: &str,
        id: &str,
        value: serde_json::Value,
        events: Vec<crate::events::Event>,
    ) -> Result<()> {
        let op = crate::catalog::CatalogOp::PutRecord {
            kind: kind.to_string(),
            id: id.to_string(),
            value,
        };
        self.inner
            .change(self.actor.clone(), move |st| {
                st.catalog.apply(&op)?;
                Ok((vec![op], events))
            })
            .await
    }

    /// Deletes a record durably (if it exists), logging `events` with it.
    pub async fn delete_record(
        &self,
        kind: &str,
        id: &str,
        events: Vec<crate::events::Event>,
    ) -> Result<()> {
        let op = crate::catalog::CatalogOp::DeleteRecord {
            kind: kind.to_string(),
            id: id.to_string(),
        };
        self.inner
            .change(self.actor.clone(), move |st| {
                st.catalog.apply(&op)?;
                Ok((vec![op], events))
            })
            .await
    }

    /// Logs an event of the control plane that changes nothing else (a hook failing).
    pub async fn log_event(&self, event: crate::events::Event) -> Result<()> {
        self.inner
            .change(self.actor.clone(), move |_| Ok((Vec::new(), vec![event])))
            .await
    }
}
