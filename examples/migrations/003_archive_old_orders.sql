-- Moves data: delivered orders placed before 2024 leave the hot table for orders_archive.
CREATE TABLE orders_archive (LIKE orders INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE orders_archive ADD PRIMARY KEY (id);
ALTER TABLE orders_archive ADD FOREIGN KEY (customer_id) REFERENCES customers (id);
INSERT INTO orders_archive
     SELECT * FROM orders WHERE status = 'delivered' AND placed_at < '2024-01-01';
DELETE FROM orders WHERE status = 'delivered' AND placed_at < '2024-01-01';
