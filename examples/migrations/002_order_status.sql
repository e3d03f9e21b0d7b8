-- Orders get a lifecycle; existing orders count as delivered.
CREATE TYPE order_status AS ENUM ('pending', 'paid', 'shipped', 'delivered', 'cancelled');
ALTER TABLE orders ADD COLUMN status order_status NOT NULL DEFAULT 'pending';
UPDATE orders SET status = 'delivered';
CREATE INDEX orders_status_idx ON orders (status) WHERE status <> 'delivered';
