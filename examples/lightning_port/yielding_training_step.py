"""Lightning's loop example where ``training_step`` is a generator, ported by changing its imports.

Lightning's example defines its own ``YieldLoop`` (an ``OptimizerLoop`` subclass); fastloop
ships that loop as ``fastloop.loops.YieldLoop``, which this port uses instead of redefining it.
Lightning 1.9 has no ``pytorch_lightning.loops.YieldLoop``, so this file does not run there.
"""
from argparse import ArgumentParser, Namespace

import torch

from fastloop import Trainer, seed_everything
from fastloop.loops import YieldLoop

from examples.lightning_port.generative_adversarial_net import GAN as GANTemplate
from examples.lightning_port.generative_adversarial_net import RandomImages


class GAN(GANTemplate):
    """This GAN uses the yield-loop to define the training step (generator)."""

    def training_step(self, batch, batch_idx, optimizer_idx):
        imgs, _ = batch

        # sample noise
        z = torch.randn(imgs.shape[0], self.hparams.latent_dim)
        z = z.type_as(imgs)

        # Here, we compute the generator output once and reuse it later.
        # It gets saved when yielding from the training_step.
        # The returned values are re-used by the discriminator
        generated_imgs = self(z)

        # train generator
        valid = torch.ones(imgs.size(0), 1)
        valid = valid.type_as(imgs)
        g_loss = self.adversarial_loss(self.discriminator(generated_imgs), valid)
        self.log("g_loss", g_loss)

        # Yield instead of return: This makes the training_step a Python generator.
        # Once we call it again, it will continue the execution with the block below
        yield g_loss

        # train discriminator
        valid = torch.ones(imgs.size(0), 1)
        valid = valid.type_as(imgs)
        real_loss = self.adversarial_loss(self.discriminator(imgs), valid)
        fake = torch.zeros(imgs.size(0), 1)
        fake = fake.type_as(imgs)
        fake_loss = self.adversarial_loss(self.discriminator(generated_imgs.detach()), fake)

        # discriminator loss is the average of these
        d_loss = (real_loss + fake_loss) / 2
        self.log("d_loss", d_loss)

        yield d_loss


def main(args: Namespace, **trainer_kwargs) -> Trainer:
    model = GAN(lr=args.lr, b1=args.b1, b2=args.b2, latent_dim=args.latent_dim)
    dm = RandomImages()
    trainer = Trainer(**{"max_epochs": 2, **trainer_kwargs})

    # Connect the new loop
    # YieldLoop now replaces the previous optimizer loop
    trainer.fit_loop.epoch_loop.batch_loop.connect(optimizer_loop=YieldLoop())

    # fit() will now use the new loop!
    trainer.fit(model, dm)
    return trainer


if __name__ == "__main__":
    seed_everything(1234)
    parser = ArgumentParser()
    parser = GANTemplate.add_argparse_args(parser)
    main(parser.parse_args())
